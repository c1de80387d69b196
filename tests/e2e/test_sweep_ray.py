"""`dynheads sweep` on a local Ray instance (loopback only, 2 workers) against the same sweep run locally.

The driver works in its own folder (`driver_root`: every run folder and input file, given as
relative paths). The actors run in another working folder (a runtime_env `working_dir`) and a
guard installed in every worker (ray_actor_guard.py) refuses them, and logs, any file operation
under the driver's folder: a command whose actor needed the driver's disk fails here. The same
log records which worker started and finished each sample.
"""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported (loopback-only Ray)

import functools
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from dynheads.errors import DynheadsError
from dynheads.sweep.run import RayOptions, run_sweep
from dynheads.sweep.spec import cells_of
from e2e.helpers import support_only

pytestmark = pytest.mark.e2e
# One cell of four 300-token samples: with 2 workers × 2 queued samples all four are dispatched at once.
CELLS = cells_of({"experiments": [{"name": "niah", "lengths": [300], "depths": [0, 30, 70, 100], "samples_per_cell": 1,
                                   "max_new_tokens": 12}]})
RUN = CELLS[0].name
HARD_LIMIT_S = 420
HOTPOT = "hotpotqa/hotpotqa_dev_distractor_first100_hf.json"
# Every command a sweep can run, each reading its input files from relative paths: the haystack, a
# head_scores JSON, the multihop questions, a BM25 corpus, and (rag) the multihop cell's run folder
# as static ranking and regressor. ablate matches its baselines' head count over the run (the
# default: two passes, the second reading the first from the run folder).
NIAH_SMALL = {"lengths": [120], "depths": [0, 100], "samples_per_cell": 1, "max_new_tokens": 3,
              "haystack": "inputs/haystack"}
RAG_SMALL = {"data": "inputs/eval.json", "prompt": "short", "max_new_tokens": 4, "max_sentence_tokens": 4,
             "rind_threshold": 0, "static_ranking": "runs/multihop__default"}
EVERY_COMMAND = {"experiments": [
    {"name": "niah", **NIAH_SMALL},
    {"name": "ablate", **NIAH_SMALL, "max_new_tokens": 2, "static_ranking": "inputs/head_scores.json", "n_boot": 100},
    {"name": "ablate-progressive", "length": 120, "samples": 2, "ks": [3], "max_new_tokens": 2,
     "haystack": "inputs/haystack", "static_ranking": "inputs/head_scores.json", "n_boot": 100},
    {"name": "multihop", "data": "inputs/detect.json", "limit": 2, "max_new_tokens": 4},
    {"name": "rag", **RAG_SMALL, "limit": 2, "heads": ["dynamic", "static", "none"],
     "regressor": "runs/multihop__default"},
    {"name": "rag", "label": "rag-corpus", **RAG_SMALL, "limit": 1, "heads": ["static"], "retrieval": "corpus",
     "corpus": "inputs/corpus.jsonl"},
]}
# Samples each command runs on the actors: niah 2; ablate 2 first pass + 2 second pass; progressive 2;
# multihop 2; rag 2 + 1.
EVERY_COMMAND_SAMPLE_RUNS = 2 + 4 + 2 + 2 + 3


@pytest.fixture(scope="module")
def driver_root(tmp_path_factory) -> Path:
    """The driver's folder: every run folder and input file of these tests; no worker may touch it."""
    return tmp_path_factory.mktemp("driver")


@pytest.fixture(scope="module")
def worker_log_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workers") / "log.txt"


@pytest.fixture(scope="module")
def local_ray(driver_root, worker_log_path, tmp_path_factory):
    """A local Ray instance started by `connect` as a sweep starts it, with the guard in every worker."""
    import ray

    from dynheads.sweep.ray_runner import connect

    actor_cwd = tmp_path_factory.mktemp("actor-cwd")
    shutil.copy(Path(__file__).with_name("ray_actor_guard.py"), actor_cwd)
    worker_log_path.touch()
    env = {"working_dir": str(actor_cwd), "worker_process_setup_hook": "ray_actor_guard.install",
           "env_vars": {"DYNHEADS_TEST_DRIVER_ROOT": str(driver_root), "DYNHEADS_TEST_WORKER_LOG": str(worker_log_path)}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", functools.partial(ray.init, runtime_env=env))
        connect(None, num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def worker_log(worker_log_path):
    """The workers' log, emptied for this test: `touched`, `start` and `done` lines (ray_actor_guard.py)."""
    worker_log_path.write_text("")
    return WorkerLog(worker_log_path)


class WorkerLog:
    """What the workers wrote: file operations refused under the driver's folder, samples started and done."""

    def __init__(self, path: Path):
        self.path = path

    def lines(self, kind: str) -> list[tuple[int, str]]:
        """(pid, rest of the line) of every `kind` line."""
        out = []
        for line in self.path.read_text().splitlines():
            word, pid, rest = (line.split(" ", 2) + [""])[:3]
            if word == kind:
                out.append((int(pid), rest))
        return out

    def held_by(self, pid: int) -> list[str]:
        """Samples the worker `pid` started and has not finished."""
        done = [s for p, s in self.lines("done") if p == pid]
        held = [s for p, s in self.lines("start") if p == pid]
        for sample in done:
            held.remove(sample)
        return held


@pytest.fixture
def in_driver_root(driver_root, request, monkeypatch) -> Path:
    """This test's folder under the driver's folder, as the current folder (relative --out and inputs)."""
    folder = driver_root / request.node.name.replace("[", "_").replace("]", "")
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(autouse=True)
def hard_timeout():
    def expire(*_):
        raise TimeoutError(f"Ray sweep test ran past {HARD_LIMIT_S} s")

    previous, threads = signal.signal(signal.SIGALRM, expire), torch.get_num_threads()
    signal.alarm(HARD_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    torch.set_num_threads(threads)  # run_sweep sets this process's threads (the driver's config records them)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    threads = torch.get_num_threads()
    try:  # 1 thread, as each Ray worker below
        run_sweep(CELLS, tmp_path_factory.mktemp("local"), threads=1, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return tmp_path_factory.getbasetemp() / "local0" / RUN


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "SampleWorker" in " ".join(_cmdline(p))]


def _cmdline(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _kill_after_first_sample(folder, how_many):
    """In the background: once a sample is written, SIGKILL `how_many` worker processes."""

    def watch():
        deadline = time.time() + HARD_LIMIT_S
        while time.time() < deadline and not list((folder / "samples").glob("*.json")):
            time.sleep(0.05)
        for p in _workers()[:how_many]:
            p.kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _kill_a_worker_holding_a_sample(folder: Path, log: WorkerLog, killed: dict) -> threading.Thread:
    """In the background: once a sample is written, SIGKILL a worker in the middle of a sample.

    Each worker is frozen (SIGSTOP) while its log is read, so the sample it holds cannot finish
    between the check and the kill; `killed` gets its pid and the samples it held.
    """

    def watch():
        deadline = time.time() + HARD_LIMIT_S
        while time.time() < deadline and not list((folder / "samples").glob("*.json")):
            time.sleep(0.05)
        while time.time() < deadline and not killed:
            for p in _workers():
                try:
                    p.suspend()
                    held = log.held_by(p.pid)
                    if held:
                        p.kill()
                        killed.update(pid=p.pid, held=held)
                        return
                    p.resume()
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_same_run(a: Path, b: Path, n_samples: int) -> None:
    """Records, sample results, result JSONs and config (but its creation time) are equal; the same for
    the run folders inside (a detection pass, an ablation's first pass)."""
    names = sorted(p.name for p in (a / "records").glob("*.npz"))
    assert names == sorted(p.name for p in (b / "records").glob("*.npz")) and len(names) == n_samples, (a, b)
    for name in names:
        x, y = np.load(a / "records" / name), np.load(b / "records" / name)
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{b}/{name}/{key}")
    for sub in ("samples", "results"):
        assert sorted(p.name for p in (a / sub).glob("*.json")) == sorted(p.name for p in (b / sub).glob("*.json"))
        for p in (a / sub).glob("*.json"):
            assert json.loads(p.read_text()) == json.loads((b / sub / p.name).read_text()), b / sub / p.name
    assert not list(b.glob("*/*.tmp*"))
    assert {k: v for k, v in json.loads((b / "config.json").read_text()).items() if k != "created"} == \
        {k: v for k, v in json.loads((a / "config.json").read_text()).items() if k != "created"}
    inner = sorted(p.parent.name for p in a.glob("*/config.json"))
    assert inner == sorted(p.parent.name for p in b.glob("*/config.json"))
    for name in inner:
        _assert_same_run(a / name, b / name, len(list((a / name / "records").glob("*.npz"))))


def _write_inputs(folder: Path, shared_data: Path) -> None:
    """inputs/: a haystack, a head_scores JSON, multi-hop detection and evaluation questions, a corpus."""
    inputs = folder / "inputs"
    (inputs / "haystack").mkdir(parents=True)
    for essay in ("addiction.txt", "aord.txt"):
        shutil.copy(shared_data / "niah" / "PaulGrahamEssays" / essay, inputs / "haystack")
    scores = np.random.default_rng(0).random((30, 9))  # the default model: 30 layers × 9 heads
    (inputs / "head_scores.json").write_text(json.dumps({f"{l}-{h}": [float(scores[l, h])] for l in range(30)
                                                        for h in range(9)}))
    records = json.loads((shared_data / HOTPOT).read_text())
    (inputs / "detect.json").write_text(json.dumps([support_only(r) for r in records[:2]]))
    (inputs / "eval.json").write_text(json.dumps([support_only(r) for r in records[2:4]]))
    passages = [{"id": f"q{n}-p{i}", "title": title, "text": " ".join(sentences)} for n, r in enumerate(records[:20])
                for i, (title, sentences) in enumerate(zip(r["context"]["title"], r["context"]["sentences"]))]
    (inputs / "corpus.jsonl").write_text("\n".join(json.dumps(p) for p in passages) + "\n")


def test_local_ray_listens_on_loopback_only(local_ray):
    procs = psutil.Process().children(recursive=True)
    addresses = {c.laddr.ip for p in procs for c in _connections(p) if c.status == psutil.CONN_LISTEN}
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses


def _connections(p):
    try:
        return p.net_connections(kind="inet")
    except psutil.Error:
        return []


def test_a_worker_cannot_see_the_drivers_folder(local_ray, in_driver_root, worker_log):
    """What the tests below rely on: a worker runs elsewhere, and the driver's files are refused and logged."""
    from dynheads.sweep.ray_runner import _get

    Path("data.txt").write_text("the driver's data")
    read = local_ray.remote(Path.read_text)
    with pytest.raises(FileNotFoundError):  # a relative path: the worker's own folder has no such file
        _get(local_ray, read.remote(Path("data.txt")))
    with pytest.raises(PermissionError, match="touched the driver's folder"):
        _get(local_ray, read.remote(in_driver_root / "data.txt"))
    assert [event for _, event in worker_log.lines("touched")] == [f"open {in_driver_root / 'data.txt'}"]


def test_every_command_on_ray_touches_no_driver_file_and_equals_local(local_ray, in_driver_root, worker_log,
                                                                      shared_data):
    _write_inputs(in_driver_root, shared_data)
    cells = cells_of(EVERY_COMMAND)
    assert [c.experiment for c in cells] == ["niah", "ablate", "ablate-progressive", "multihop", "rag", "rag"]
    assert cells[3].name == "multihop__default"  # the rag cells' static ranking and regressor
    run_sweep(cells, "runs", threads=1, quiet=True)  # the reference, in this process
    Path("runs").rename("local")
    assert not worker_log.lines("start")
    run_sweep(cells, "runs", RayOptions(workers=2), threads=1, quiet=True)
    assert worker_log.lines("touched") == []
    started, done = worker_log.lines("start"), worker_log.lines("done")
    assert len(started) == len(done) == EVERY_COMMAND_SAMPLE_RUNS  # every sample ran on an actor
    assert len({pid for pid, _ in done}) == 2
    for cell in cells:
        _assert_same_run(Path("local") / cell.name, Path("runs") / cell.name,
                         len(list((Path("local") / cell.name / "records").glob("*.npz"))))
    ablate = Path("runs") / cells[1].name
    assert {p.name for p in ablate.iterdir() if (p / "config.json").exists()} == {"first_pass"}


def test_ray_sweep_equals_local_and_survives_a_killed_worker(local_ray, local_run, in_driver_root, worker_log,
                                                             caplog):
    killed: dict = {}
    watcher = _kill_a_worker_holding_a_sample(in_driver_root / "runs" / RUN, worker_log, killed)
    run_sweep(CELLS, "runs", RayOptions(workers=2), threads=1, quiet=True)
    watcher.join()
    assert killed, "no worker was killed in the middle of a sample"
    assert _gone(killed["pid"])
    assert "a Ray worker died; 1 workers left" in caplog.text
    (sample,) = killed["held"]  # one sample runs at a time per worker
    ran = [(pid, s) for pid, s in worker_log.lines("start") if s == sample]
    finished = [(pid, s) for pid, s in worker_log.lines("done") if s == sample]
    assert ran[0] == (killed["pid"], sample) and len(ran) == 2  # started on the killed worker, then sent again
    assert finished == [ran[1]] and ran[1][0] != killed["pid"]  # and finished on the other one
    assert worker_log.lines("touched") == []
    deadline = time.time() + 30
    while _workers() and time.time() < deadline:  # the pool's actors end with the sweep
        time.sleep(0.2)
    assert not _workers()
    _assert_same_run(local_run, Path("runs") / RUN, 4)
    before = {p.name: p.stat().st_mtime_ns for p in (Path("runs") / RUN / "samples").glob("*.json")}
    run_sweep(CELLS, "runs", RayOptions(workers=2), threads=1, quiet=True)  # a rerun redoes nothing
    assert not _workers()  # and starts no worker
    assert {p.name: p.stat().st_mtime_ns for p in (Path("runs") / RUN / "samples").glob("*.json")} == before


def test_rerun_after_all_workers_died_finishes_the_missing_samples_only(local_ray, local_run, in_driver_root,
                                                                       worker_log):
    watcher = _kill_after_first_sample(in_driver_root / "runs" / RUN, how_many=2)
    with pytest.raises(DynheadsError, match="all Ray workers died"):
        run_sweep(CELLS, "runs", RayOptions(workers=2), threads=1, quiet=True)
    watcher.join()
    samples = Path("runs") / RUN / "samples"
    finished = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.json")}
    assert 1 <= len(finished) < 4
    run_sweep(CELLS, "runs", RayOptions(workers=2), threads=1, quiet=True)
    now = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.json")}
    assert len(now) == 4 and all(now[k] == v for k, v in finished.items())
    assert worker_log.lines("touched") == []
    _assert_same_run(local_run, Path("runs") / RUN, 4)


@pytest.mark.parametrize("case", ["missing_spec", "bad_argument", "bad_cell"])
def test_sweep_bad_input_is_a_one_line_error(case, tmp_path):
    from e2e.helpers import assert_one_line_error, dynheads

    spec = tmp_path / "s.toml"
    spec.write_text('[[experiments]]\nname = "niah"\nlengths = [300]\ndepths = [0, 150]\n')
    if case == "missing_spec":
        assert_one_line_error(dynheads("sweep", tmp_path / "nope.toml", "--out", tmp_path / "o"), "does not exist")
    elif case == "bad_argument":
        assert_one_line_error(dynheads("sweep", spec, "--out", tmp_path / "o", "--rya"), "unexpected argument")
    else:  # checked before any model loads or Ray starts
        assert_one_line_error(dynheads("sweep", spec, "--out", tmp_path / "o", "--ray"),
                              "sweep cell niah__default__seed0: depth 150 is outside 0-100")
    assert not (tmp_path / "o").exists()
