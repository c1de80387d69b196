"""Bad input through the real command line: exit 2 (Ctrl-C: 130), one `error:` line, no traceback.

Most cases fail before the model loads, and without importing torch or transformers at all: each
command runs under a wrapper that reports which heavy modules were imported (no timing).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from e2e.helpers import BIN, assert_one_line_error

pytestmark = pytest.mark.e2e
HEAVY = ("torch", "transformers")
WRAPPER = ("import sys\nfrom dynheads.cli import main\ntry:\n    main()\nfinally:\n"
           "    print('HEAVY:' + ','.join(m for m in %r if m in sys.modules))" % (HEAVY,))


def cli(*args, cwd=None):
    """Run `dynheads ARGS` in-process of a fresh interpreter; returns (process, heavy modules imported)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)
    marker = [l for l in proc.stdout.splitlines() if l.startswith("HEAVY:")]
    return proc, marker[-1][len("HEAVY:"):] if marker else "?"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad files and folders, made once: a file, garbage haystack, bad needles, non-trace run folders."""
    root = tmp_path_factory.mktemp("bad")
    (root / "file").write_text("not a folder")
    (root / "garbage").mkdir()
    (root / "garbage" / "a.txt").write_bytes(np.random.default_rng(0).bytes(20_000))
    (root / "needles.jsonl").write_text('{"needle": "x"}\n')
    for kind, key in (("ablation", "none__token_id"), ("rag", "static__token_id")):
        run = root / kind
        for sub in ("records", "samples"):
            (run / sub).mkdir(parents=True)
        layout = {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3}
        (run / "config.json").write_text(json.dumps({"kind": kind, "layout": layout, "seed": 0}))
        np.savez(run / "records" / "s.npz", **{key: np.arange(3)})
        (run / "samples" / "s.json").write_text(json.dumps({"id": "s", "order": 0}))
    # a traced NIAH run whose only sample was answered wrong: Wu et al.'s head scores have nothing to average
    wrong = root / "wrong"
    for sub in ("records", "samples"):
        (wrong / sub).mkdir(parents=True)
    (wrong / "config.json").write_text(json.dumps({"kind": "niah", "layout": layout, "seed": 0,
                                                   "score": {"name": "copy_paste", "args": {"span": "needle"}}}))
    np.savez(wrong / "records" / "s.npz", token_id=np.arange(3), score=np.zeros((3, 30, 9), np.float32),
             top1_pos=np.zeros((3, 30, 9), np.int64), top1_token=np.zeros((3, 30, 9), np.int64))
    (wrong / "samples" / "s.json").write_text(json.dumps({"id": "s", "order": 0, "accuracy": 0.0,
                                                          "token_spans": {"needle": [[5, 9]], "answer": [[6, 8]]}}))
    for name, text in (("config_not_json", "{not json"), ("config_list", "[1, 2]")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
    for name, text in (("state_not_json", "nope"), ("state_list", "[1]"), ("state_no_steps", '{"config": {}}')):
        (root / name).mkdir()
        (root / name / "reproduce.json").write_text(text)
    (root / "model_with_config").mkdir()
    (root / "model_with_config" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "empty").mkdir()
    spec = '[[experiments]]\nname = "niah"\nlengths = [300]\ndepths = [50]\n'
    (root / "grid_type.toml").write_text(spec + '[experiments.grid]\nmax_new_tokens = ["many", "more"]\n')
    (root / "fixed_type.toml").write_text(spec + 'samples_per_cell = "two"\n')
    (root / "ok.toml").write_text(spec + "samples_per_cell = 1\n")
    return root


NIAH = ["niah", "--lengths", "300", "--depths", "50", "--samples-per-cell", "1"]
# (name, arguments with {root} and {out}, fragment of the error line)
CASES = [
    ("unknown option", ["niah", "--no-such-option", "1"], "no such option: --no-such-option"),
    ("unknown command", ["nosuchcmd"], "no such command 'nosuchcmd'"),
    ("no arguments", [], "no command given"),
    ("missing --out", ["niah"], "missing option '--out'"),
    ("non-integer value", NIAH + ["--seed", "x", "--out", "{out}"], "invalid value for '--seed'"),
    ("non-integer list", ["niah", "--lengths", "abc", "--out", "{out}"], "--lengths expects comma-separated int"),
    ("bad global flag", ["--threads", "-1", "list", "tasks"], "invalid value for '--threads'"),
    ("missing argument", ["list"], "missing argument 'what'"),
    ("unknown list", ["list", "foo"], "cannot list 'foo'"),
    ("out is a file", NIAH + ["--out", "{root}/file"], "is a file, not a run folder"),
    ("out under a file", NIAH + ["--out", "{root}/file/run"], "is a file, so no folder can be made under it"),
    ("out read-only", NIAH + ["--out", "/proc/dynheads/run"], "cannot write in /proc"),
    ("garbage haystack", NIAH + ["--haystack", "{root}/garbage", "--out", "{out}"], "a.txt is not UTF-8 text"),
    ("bad needle file", NIAH + ["--needles", "{root}/needles.jsonl", "--out", "{out}"], "line 1"),
    ("depth out of range", ["niah", "--depths", "150", "--out", "{out}"], "depth 150 is outside 0-100"),
    ("zero samples", ["niah", "--samples-per-cell", "0", "--out", "{out}"], "'--samples-per-cell'"),
    ("static-top 0", ["dynamism", "{root}/ablation", "--static-top", "0"], "'--static-top'"),
    ("static-top 0 progressive", ["ablate-progressive", "--static-top", "0", "--out", "{out}"], "'--static-top'"),
    ("patience -1", ["probe", "{root}/ablation", "--patience", "-1"], "'--patience'"),
    ("missing static ranking", ["ablate", "--static-ranking", "{root}/nope.json", "--out", "{out}"],
     "static ranking"),
    ("dynamism on an ablation run", ["dynamism", "{root}/ablation"], "holds a run of kind 'ablation'"),
    ("cca on a rag run", ["cca", "{root}/rag"], "holds a run of kind 'rag'"),
    ("not a run folder", ["dynamism", "{root}"], "is not a dynheads run folder"),
    ("missing data file", ["multihop", "--data", "{root}/nope.json", "--out", "{out}"], "nope.json"),
    ("rag data not multi-hop", ["rag", "--data", "{root}/needles.jsonl", "--out", "{out}"], "needles.jsonl"),
    # the audit of issue 17: each of these was an internal failure, accepted, a hang or a blocked correction
    ("sweep grid value of the wrong type", ["sweep", "{root}/grid_type.toml", "--out", "{out}"],
     "grid: 'max_new_tokens' expects an integer, got 'many'"),
    ("sweep fixed value of the wrong type", ["sweep", "{root}/fixed_type.toml", "--out", "{out}"],
     "'samples_per_cell' expects an integer, got 'two'"),
    ("sweep spec is a folder", ["sweep", "{root}", "--out", "{out}"], "is a folder; give the TOML file"),
    ("sweep on an unreachable Ray address", ["sweep", "{root}/ok.toml", "--out", "{out}", "--ray", "127.0.0.1:1"],
     "--ray 127.0.0.1:1: no Ray head reachable within 5 s"),
    ("sparse n-boot 0", ["sparse", "--detection", "{root}/wrong", "--n-boot", "0", "--out", "{out}"],
     "invalid value for '--n-boot'"),
    ("sparse budget 0", ["sparse", "--detection", "{root}/wrong", "--budgets", "0,4", "--out", "{out}"],
     "a budget of 0 opens no head"),
    ("sparse names its detection run", ["sparse", "--detection", "{root}/ablation", "--out", "{out}"],
     "detection run {root}/ablation is not a traced run"),
    ("view config not JSON", ["view", "{root}/config_not_json", "--out", "{out}"],
     "config_not_json is not a dynheads run folder: its config.json is not a run config"),
    ("view config a JSON list", ["view", "{root}/config_list", "--out", "{out}"],
     "config_list is not a dynheads run folder: its config.json is not a run config"),
    ("view out is a folder", ["view", "{root}/wrong", "--out", "{root}"], "is a folder; give the file to write"),
    ("view out under a file", ["view", "{root}/wrong", "--out", "{root}/file/v.html"],
     "file is a file, so nothing can be written under it"),
    ("view a folder that does not exist", ["view", "{root}/nope", "--out", "{out}"], "{root}/nope does not exist"),
    ("report state not JSON", ["report", "{root}/state_not_json"], "state_not_json/reproduce.json is not JSON"),
    ("report state a JSON list", ["report", "{root}/state_list"], "state_list/reproduce.json is not a reproduction"),
    ("report state without steps", ["report", "{root}/state_no_steps"], "is not a reproduction state"),
    ("export-heads out under a file", ["export-heads", "{root}/wrong", "--top", "5", "--out", "{root}/file/x"],
     "file is a file, so nothing can be written under it"),
    ("export-heads negative sink", ["export-heads", "{root}/wrong", "--top", "5", "--sink", "-1", "--out", "{out}"],
     "invalid value for '--sink'"),
    ("export-heads nothing to score", ["export-heads", "{root}/wrong", "--format", "retrieval_head", "--out",
                                       "{out}"], "has no correctly answered sample"),
    ("reproduce out is a file", ["reproduce", "--out", "{root}/file"], "is a file, not a run folder"),
    ("reproduce missing hotpotqa", ["reproduce", "--hotpotqa", "{root}/nope.json", "--out", "{out}"],
     "--hotpotqa {root}/nope.json does not exist"),
    ("reproduce overlapping HotpotQA slices", ["reproduce", "--rag-questions", "40", "--out", "{out}"],
     "evaluation records 0-40 overlap the detection records 30-50"),
    ("conformance unknown family", ["conformance", "--family", "nosuch"], "unknown --family 'nosuch'"),
    ("model folder without config", NIAH + ["--model", "{root}/empty", "--out", "{out}"],
     "model folder {root}/empty has no config.json, so it is not a Hugging Face model folder"),
    ("model folder without weights", NIAH + ["--model", "{root}/model_with_config", "--out", "{out}"],
     "holds a config.json but no weights (no *.safetensors or *.bin file)"),
    ("analysis of a folder that does not exist", ["dynamism", "{root}/nope"], "{root}/nope does not exist"),
]
# These need transformers to answer (its list of model types; the model loader's folder checks run in
# load_model, whose module imports torch); every other case fails before torch or transformers is imported.
IMPORTS_TORCH = {"conformance unknown family", "model folder without config", "model folder without weights"}


@pytest.mark.parametrize("name,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_with_one_error_line(name, args, fragment, inputs, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    proc, heavy = cli(*[a.format(root=inputs, out=out) for a in args])
    assert time.monotonic() - started < 30, f"{name} took {time.monotonic() - started:.0f} s"  # no hang (Ray)
    assert_one_line_error(proc, fragment.format(root=inputs))
    assert heavy == "" or name in IMPORTS_TORCH, f"{name} imported {heavy}"
    assert not out.exists()  # nothing is created before the input is valid
    for bad_config in ("config_not_json", "config_list"):  # a folder that is no run gets no results/ or figures/
        assert [p.name for p in (inputs / bad_config).iterdir()] == ["config.json"]


@pytest.mark.parametrize("args", [["--help"], ["niah", "--help"]] + [["list", w] for w in (
    "tasks", "scores", "ablations", "selectors", "triggers", "retrievers")])
def test_help_and_list_answer_without_torch(args):
    proc, heavy = cli(*args)
    assert proc.returncode == 0 and proc.stdout.strip() and not proc.stderr.strip(), proc.stderr
    assert heavy == ""


def test_python_api_imports_lazily():
    code = ("import sys, dynheads; assert 'torch' not in sys.modules; f = dynheads.load_model; "
            "assert 'torch' in sys.modules and f.__name__ == 'load_model'; "
            "assert dynheads.dynamism.__name__ == 'dynheads.experiments.dynamism'; "
            "print(all(hasattr(dynheads, n) for n in dynheads.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr


@pytest.mark.parametrize("case", ["truncated_gguf", "device"])
def test_model_errors_before_loading(case, tmp_path):
    from dynheads.models import default_model_path

    base = NIAH + ["--out", tmp_path / "out"]
    if case == "truncated_gguf":
        cut = tmp_path / "cut.gguf"
        with open(default_model_path(), "rb") as f:
            cut.write_bytes(f.read(3_000_000))
        proc, _ = cli(*base, "--model", cut)
        assert_one_line_error(proc, "cut.gguf is truncated or damaged")
    else:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        proc, _ = cli(*base, "--device", f"cuda:{n}")
        assert_one_line_error(proc, f"--device cuda:{n}")
    assert not (tmp_path / "out").exists()


def test_busy_out_is_refused_before_the_model_loads(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "from dynheads.runs import RunDir; import sys; run = "
                               f"RunDir.create({str(tmp_path / 'run')!r}, {{'kind': 'niah'}}); print('ok', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        proc, heavy = cli(*NIAH, "--out", tmp_path / "run")
        assert_one_line_error(proc, f"being written by another dynheads process (pid {holder.pid})")
        assert heavy == ""
    finally:
        holder.kill()
        holder.wait()


def _interrupt(args, ready) -> subprocess.CompletedProcess:
    # SIGINT back to its default in the child: a shell's background job (and its children) ignore it
    proc = subprocess.Popen([str(BIN), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not ready():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path):
    started = time.time()
    proc = _interrupt([*NIAH, "--quiet", "--out", tmp_path / "run"], lambda: time.time() - started > 1.0)
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "Traceback" not in proc.stderr


def test_ctrl_c_during_a_run_exits_130_and_says_where_it_stopped(tmp_path):
    out = tmp_path / "run"
    args = ["niah", "--lengths", "250", "--depths", "0,50,100", "--samples-per-cell", "1", "--max-new-tokens", "8",
            "--quiet", "--out", out]
    proc = _interrupt(args, lambda: bool(list(out.glob("samples/*.json"))))
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    finished = len(list(out.glob("samples/*.json")))
    assert lines[0].startswith(f"error: interrupted: {finished} of 3 samples are finished in {out}")
    assert "last finished: niah-250-0-0" in lines[0] and lines[0].endswith("rerun the same command to resume")
