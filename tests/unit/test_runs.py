"""Run folders under faults: a second writer, concurrent sample writes, stale temporaries, damaged
samples, run folders of the wrong kind, unwritable --out, resumes that would mix inputs, result names."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict

import numpy as np
import pytest

from dynheads.errors import ConfigError, DataError
from dynheads.experiments.cca import CcaConfig
from dynheads.experiments.trace import niah_inputs
from dynheads.runs import RunDir, check_out, check_out_file, result_name
from dynheads.tasks.niah import NiahConfig

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _sample(run: RunDir, sid: str, order: int = 0, steps: int = 3) -> None:
    run.write_sample(sid, {"token_id": np.arange(steps), "score": np.ones((steps, 2, 2), np.float32)}, {"order": order})


def test_a_second_writer_is_refused_until_the_first_process_dies(tmp_path):
    holder = _python(f"""
        from dynheads.runs import RunDir
        run = RunDir.create({str(tmp_path / 'run')!r}, {{"kind": "test"}})
        print("locked", flush=True)
        input()
    """, stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
    with pytest.raises(ConfigError, match=rf"being written by another dynheads process \(pid {holder.pid}\)"):
        RunDir.create(tmp_path / "run", {"kind": "test"})
    with pytest.raises(ConfigError, match="being written by another"):
        check_out(tmp_path / "run")  # the CLI's check before the model loads
    os.kill(holder.pid, signal.SIGKILL)  # a killed writer leaves no stale lock
    holder.wait()
    run = RunDir.create(tmp_path / "run", {"kind": "test"})
    assert RunDir.create(tmp_path / "run", {"kind": "test"}).lock is run.lock  # the same process may resume


WRITER = """
    import sys
    import numpy as np
    from dynheads.runs import RunDir
    run, me = RunDir(sys.argv[1]), int(sys.argv[2])
    failures = 0
    for i in range(120):
        try:
            run.write_sample(f"s{i % 6}", {"token_id": np.full(2000, me), "x": np.full((50, 30), me)}, {"writer": me})
        except Exception as exc:
            failures += 1
            print(type(exc).__name__, exc, file=sys.stderr)
    print(failures)
"""


def test_two_writers_on_one_folder_never_fail_or_show_a_broken_file(tmp_path):
    run = RunDir.create(tmp_path / "run", {"kind": "test"})
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(run.path), str(w)], env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for w in (1, 2)]
    seen = 0
    while any(w.poll() is None for w in writers) or seen == 0:
        for p in run.path.glob("samples/*.json"):
            row = json.loads(p.read_text())  # a reader never meets a half-written file
            assert row["writer"] in (1, 2)
            with np.load(run.path / "records" / f"{p.stem}.npz") as z:
                assert set(np.unique(z["token_id"])) <= {1, 2} and z["x"].shape == (50, 30)
            seen += 1
    outs = [w.communicate() for w in writers]
    assert [o.strip() for o, _ in outs] == ["0", "0"], [e for _, e in outs]
    assert run.done_samples() == {f"s{i}" for i in range(6)}
    assert not [p for p in run.path.rglob("*") if ".tmp" in p.name]


def test_stale_temporaries_of_dead_writers_are_removed_on_resume(tmp_path):
    run = RunDir.create(tmp_path / "run", {"kind": "test"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [run.path / "records" / f"a.npz.tmp{dead_pid}-0a1b2c3d", run.path / "records" / "b.tmp.npz",
             run.path / "samples" / f"c.json.tmp{dead_pid}", run.path / f"config.json.tmp{dead_pid}-ffee0011"]
    live = run.path / "samples" / f"d.json.tmp{os.getpid()}-12345678"
    for p in stale + [live]:
        p.write_text("partial")
    del run
    RunDir.create(tmp_path / "run", {"kind": "test"})
    assert [p.exists() for p in stale] == [False] * len(stale) and live.exists()


def test_empty_or_damaged_samples_are_named_and_not_counted_as_finished(tmp_path, caplog):
    run = RunDir.create(tmp_path / "run", {"kind": "test"})
    for i, sid in enumerate(("good", "empty_json", "empty_npz")):
        _sample(run, sid, i)
    (run.path / "samples" / "empty_json.json").write_text("")
    (run.path / "records" / "empty_npz.npz").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dynheads.runs"):
        assert run.done_samples() == {"good"}
    assert "empty_json.json is empty or damaged" in caplog.text and "empty_npz.npz is missing" in caplog.text
    with pytest.raises(DataError, match=r"samples/empty_json.json is empty or damaged"):
        run.sample_results()
    (run.path / "samples" / "empty_json.json").unlink()
    with pytest.raises(DataError, match=r"records file .*empty_npz.npz is missing or damaged"):
        run.read_records()


def test_records_kept_per_condition_name_the_kind_of_run(tmp_path):
    run = RunDir.create(tmp_path / "abl", {"kind": "ablation"})
    run.write_sample("s", {"none__token_id": np.arange(2), "dynamic__token_id": np.arange(2)}, {"order": 0})
    RunDir.create(tmp_path / "abl" / "detection", {"kind": "niah"})
    with pytest.raises(DataError, match=r"holds a run of kind 'ablation'.*`dynheads niah` or `dynheads multihop`"
                                        r".*static-ranking pass .*abl/detection is one"):
        RunDir.open(run.path).read_records()


def test_out_that_cannot_become_a_run_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a run folder"):
        check_out(tmp_path / "file")
    with pytest.raises(ConfigError, match="is a file, so no folder can be made under it"):
        check_out(tmp_path / "file" / "sub" / "run")
    with pytest.raises(ConfigError, match="cannot write in /proc"):
        check_out("/proc/dynheads-test/run")  # read-only for every user, root included
    with pytest.raises(ConfigError, match="is a file"):
        RunDir.create(tmp_path / "file", {"kind": "test"})
    check_out(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_output_file_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"--out {tmp_path} is a folder; give the file to write"):
        check_out_file(tmp_path)  # a folder as the HTML file: refused
    check_out_file(tmp_path, folder_ok=True)  # where a folder is a valid output (export-heads)
    with pytest.raises(ConfigError, match="--json .*file/sub/x.json: .*file is a file, so nothing can be written under it"):
        check_out_file(tmp_path / "file" / "sub" / "x.json", "--json")
    with pytest.raises(ConfigError, match="cannot write in /proc"):
        check_out_file("/proc/dynheads-test/view.html")
    check_out_file(tmp_path / "new" / "view.html")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("", r"is not a dynheads run folder \(no config.json\)"),
    ("{not json", "its config.json is not a run config"), ("[1, 2]", "its config.json is not a run config")])
def test_opening_a_folder_that_is_no_run_writes_nothing_into_it(tmp_path, content, message):
    folder = tmp_path / "run"
    if content is not None:
        folder.mkdir()
        if content:
            (folder / "config.json").write_text(content)
    before = sorted(folder.iterdir()) if folder.exists() else None
    with pytest.raises(DataError, match=message):
        RunDir.open(folder)
    assert (sorted(folder.iterdir()) if folder.exists() else None) == before  # no results/ or figures/
    with pytest.raises(DataError, match=f"^detection run {folder} "):
        RunDir.open(folder, what="detection run")
    RunDir.create(tmp_path / "ok", {"kind": "niah"})
    assert RunDir.open(tmp_path / "ok").config == {"kind": "niah"}


def test_resume_compares_resolved_input_paths_and_their_contents(tmp_path, monkeypatch):
    def config(haystack):
        niah, inputs = niah_inputs(NiahConfig(lengths=(300,), haystack=haystack))
        return {"kind": "niah", "task": asdict(niah), "inputs": inputs}

    for d, text in (("a", "first haystack text"), ("b", "another haystack")):
        (tmp_path / d / "hay").mkdir(parents=True)
        (tmp_path / d / "hay" / "x.txt").write_text(text)
    monkeypatch.chdir(tmp_path / "a")
    RunDir.create(tmp_path / "run", config("hay"))
    RunDir.create(tmp_path / "run", config(str(tmp_path / "a" / "hay")))  # same folder, absolute: resumes
    RunDir.create(tmp_path / "run", config("./hay/../hay"))
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ConfigError, match="different config .*haystack"):
        RunDir.create(tmp_path / "run", config("hay"))  # same relative path, other folder and text
    monkeypatch.chdir(tmp_path / "a")
    (tmp_path / "a" / "hay" / "x.txt").write_text("edited in place")
    with pytest.raises(ConfigError, match=r"different config \(inputs.haystack.sha256"):
        RunDir.create(tmp_path / "run", config("hay"))


def test_results_with_other_flags_are_kept_under_their_own_names(tmp_path):
    run = RunDir.create(tmp_path / "run", {"kind": "test"})
    assert result_name("cca", CcaConfig()) == "cca"
    assert result_name("cca", CcaConfig(max_offset=3, threads=0)) == "cca__max_offset=3"
    run.write_result("cca", {"k": 3}, CcaConfig(max_offset=3))
    run.write_result("cca", {"k": 1}, CcaConfig(max_offset=1))
    read = lambda name: json.loads((run.path / "results" / f"{name}.json").read_text())  # noqa: E731
    assert read("cca__max_offset=3") == {"k": 3} and read("cca__max_offset=1") == {"k": 1}
    assert read("cca") == {"k": 1}  # the plain name: the latest call, as before
    assert result_name("d", NiahConfig(haystack="/some/long/path/to/hay")).startswith("d__haystack=hay-")
