"""`dynheads sweep` on a local Ray instance (loopback only, 2 workers) against the same sweep run locally."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported (loopback-only Ray)

import json
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from dynheads.errors import DynheadsError
from dynheads.sweep.run import RayOptions, run_sweep
from dynheads.sweep.spec import cells_of

pytestmark = pytest.mark.e2e
# One cell of four 300-token samples: with 2 workers × 2 queued samples all four are dispatched at once.
CELLS = cells_of({"experiments": [{"name": "niah", "lengths": [300], "depths": [0, 30, 70, 100], "samples_per_cell": 1,
                                   "max_new_tokens": 12}]})
RUN = CELLS[0].name
HARD_LIMIT_S = 420


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from dynheads.sweep.ray_runner import connect

    connect(None, num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


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


def _assert_same_run(a, b):
    names = sorted(p.name for p in (a / "records").glob("*.npz"))
    assert names == sorted(p.name for p in (b / "records").glob("*.npz")) and len(names) == 4
    for name in names:
        x, y = np.load(a / "records" / name), np.load(b / "records" / name)
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}/{key}")
    for p in (a / "samples").glob("*.json"):
        assert json.loads(p.read_text()) == json.loads((b / "samples" / p.name).read_text())
    assert not list(b.glob("*/*.tmp*"))
    assert {k: v for k, v in json.loads((b / "config.json").read_text()).items() if k != "created"} == \
        {k: v for k, v in json.loads((a / "config.json").read_text()).items() if k != "created"}


def test_local_ray_listens_on_loopback_only(local_ray):
    procs = psutil.Process().children(recursive=True)
    addresses = {c.laddr.ip for p in procs for c in _connections(p) if c.status == psutil.CONN_LISTEN}
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses


def _connections(p):
    try:
        return p.net_connections(kind="inet")
    except psutil.Error:
        return []


def test_ray_sweep_equals_local_and_survives_a_killed_worker(local_ray, local_run, tmp_path):
    watcher = _kill_after_first_sample(tmp_path / RUN, how_many=1)
    run_sweep(CELLS, tmp_path, RayOptions(workers=2), threads=1, quiet=True)
    watcher.join()
    deadline = time.time() + 30
    while _workers() and time.time() < deadline:  # the pool's actors end with the sweep
        time.sleep(0.2)
    assert not _workers()
    _assert_same_run(local_run, tmp_path / RUN)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / RUN / "samples").glob("*.json")}
    run_sweep(CELLS, tmp_path, RayOptions(workers=2), threads=1, quiet=True)  # a rerun redoes nothing
    assert not _workers()  # and starts no worker
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / RUN / "samples").glob("*.json")} == before


def test_rerun_after_all_workers_died_finishes_the_missing_samples_only(local_ray, local_run, tmp_path):
    watcher = _kill_after_first_sample(tmp_path / RUN, how_many=2)
    with pytest.raises(DynheadsError, match="all Ray workers died"):
        run_sweep(CELLS, tmp_path, RayOptions(workers=2), threads=1, quiet=True)
    watcher.join()
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / RUN / "samples").glob("*.json")}
    assert 1 <= len(finished) < 4
    run_sweep(CELLS, tmp_path, RayOptions(workers=2), threads=1, quiet=True)
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / RUN / "samples").glob("*.json")}
    assert len(now) == 4 and all(now[k] == v for k, v in finished.items())
    _assert_same_run(local_run, tmp_path / RUN)


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
