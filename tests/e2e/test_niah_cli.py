"""The default model end to end through the CLI: trace, analyse, resume, determinism, bad input."""
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from e2e.helpers import BIN, assert_one_line_error, dynheads

pytestmark = pytest.mark.e2e
GRID = ["--lengths", "300", "--depths", "0,100", "--samples-per-cell", "1", "--max-new-tokens", "40"]


@pytest.fixture(scope="module")
def niah_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "niah"
    proc = dynheads("niah", "--model", "default", *GRID, "--out", out, "--threads", "1")  # the global flag, after
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_niah_run_folder(niah_run):
    out, proc = niah_run
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["fingerprint"] and cfg["layout"] == {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3}
    assert {"torch", "transformers"} <= set(cfg["versions"])
    assert cfg["threads"] == 1  # --threads 1 reached torch (its default here is one thread per core)
    assert cfg["inputs"] == {"haystack": None, "needles": None}
    results = sorted(json.loads(p.read_text())["id"] for p in (out / "samples").glob("*.json"))
    assert results == ["niah-300-0-0", "niah-300-100-0"]
    from dynheads.records import load_records

    rec = load_records(out)
    assert rec.array("top1_pos").shape[1:] == (30, 9) and rec.hidden().shape[1] == 576
    assert set(rec.array("score").reshape(-1).tolist()) <= {0.0, 1.0}
    first = json.loads((out / "samples" / "niah-300-0-0.json").read_text())
    assert first["accuracy"] == 1.0 and first["sample"]["answer"] in first["response"]


def test_dynamism_table_and_figure(niah_run):
    out, _ = niah_run
    proc = dynheads("dynamism", out)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "results" / "dynamism.json").read_text())["stats"]
    from dynheads.records import load_records

    active = load_records(out).array("score") > 0.5
    n_static = min(20, int(active.any(0).sum()))  # the static top-20 is capped at the heads ever active
    assert "llama3.1-8b (paper)" in proc.stdout and f"ln {n_static} = {math.log(n_static):.4f}" in proc.stdout
    assert len(stats["static_heads"]) == n_static and ("capped" in proc.stdout) == (n_static < 20)
    sizes = active.reshape(len(active), -1).sum(1)
    assert stats["heads_per_step_mean"] == pytest.approx(sizes.mean())
    assert stats["heads_ever_active"] == int(active.any(0).sum())
    assert (out / "figures" / "dynamism_heatmap.png").stat().st_size > 10_000
    heads = json.loads((out / "results" / "head_scores.json").read_text())
    assert len(heads) == 270 and "0-0" in heads


def test_same_command_resumes_without_redoing_and_same_seed_is_identical(niah_run, tmp_path):
    out, _ = niah_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.npz")}
    again = dynheads("niah", "--model", "default", *GRID, "--out", out)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.npz")} == before
    other = tmp_path / "again"
    # identical at the same thread count (float sums in the attention rows depend on how torch splits them)
    assert dynheads("niah", "--model", "default", "--lengths", "300", "--depths", "0", "--samples-per-cell", "1",
                    "--max-new-tokens", "40", "--out", other, "--threads", "1").returncode == 0
    a, b = np.load(out / "records" / "niah-300-0-0.npz"), np.load(other / "records" / "niah-300-0-0.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])


def test_killed_run_resumes_exactly(tmp_path):
    out = tmp_path / "killed"
    args = [str(BIN), "niah", "--model", "default", "--lengths", "250", "--depths", "0,50,100",
            "--samples-per-cell", "1", "--max-new-tokens", "30", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("samples/*.json")):  # wait for the first finished sample
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("*.json")}
    assert 1 <= len(finished) < 3
    again = dynheads("niah", "--model", "default", "--lengths", "250", "--depths", "0,50,100",
                     "--samples-per-cell", "1", "--max-new-tokens", "30", "--out", out)
    assert again.returncode == 0, again.stderr
    now = {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("*.json")}
    assert len(now) == 3 and all(now[k] == v for k, v in finished.items())
    assert len(list((out / "records").glob("*.npz"))) == 3 and not list((out / "records").glob("*.tmp*"))


def test_tracer_on_default_model_matches_generate_and_eager(default_lm):
    from dynheads.tasks.niah import NiahConfig, niah_samples
    from dynheads.tracing.tracer import TraceConfig, Tracer

    enc = next(niah_samples(default_lm.tokenizer, NiahConfig(lengths=(250,), depths=(50,), samples_per_cell=1)))
    tracer = Tracer(default_lm, TraceConfig(max_new_tokens=24))
    trace = tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans))
    ids = torch.tensor([enc.input_ids])
    model = default_lm.model
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                           eos_token_id=sorted(tracer.stop_ids), pad_token_id=sorted(tracer.stop_ids)[0])
    new = plain[0, ids.shape[1]:].tolist()
    assert trace.token_ids == [t for t in new if t not in tracer.stop_ids]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.tensor([enc.input_ids + trace.token_ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    n, t = len(enc.input_ids), len(trace.token_ids)
    ref = torch.stack([a[0, :, n - 1: n - 1 + t].argmax(-1) for a in out.attentions]).permute(2, 0, 1)
    np.testing.assert_array_equal(trace.arrays()["top1_pos"], ref.numpy())


def test_score_flag_traces_with_another_registered_score(tmp_path):
    """--score reasoning on NIAH: the run stores the score and its span, and its records hold Eq. 2 on the needle."""
    from dynheads.records import load_records
    from dynheads.scores.reasoning import reasoning_score

    out = tmp_path / "eq2"
    proc = dynheads("niah", "--model", "default", "--lengths", "300", "--depths", "50", "--samples-per-cell", "1",
                    "--max-new-tokens", "8", "--score", "reasoning", "--threads", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["score"] == {"name": "reasoning", "args": {"span": "needle"}}
    rec = load_records(out)
    score = rec.array("score")
    np.testing.assert_array_equal(score, reasoning_score(rec.array("mass_needle"), rec.array("context_mass")))
    assert score.max() > 0.1 and len(set(score.reshape(-1).tolist())) > 2  # continuous, not Eq. 1's 0/1
    assert_one_line_error(dynheads("niah", "--score", "nosuch", "--out", tmp_path / "r"),
                          "unknown head score 'nosuch'; choose one of: copy_paste, reasoning")


@pytest.mark.parametrize("case", ["unknown_model", "corrupt_gguf", "empty_haystack", "too_long", "bad_needles",
                                  "changed_config"])
def test_bad_input_is_a_one_line_error(case, tmp_path, niah_run):
    base = ["niah", "--lengths", "300", "--depths", "50", "--samples-per-cell", "1", "--out", tmp_path / "r"]
    if case == "unknown_model":
        proc = dynheads(*base, "--model", tmp_path / "nope")
        assert_one_line_error(proc, "is not a named model (default, gemma3-270m)")
    elif case == "corrupt_gguf":
        bad = tmp_path / "broken.gguf"
        bad.write_bytes(b"GGUF" + os.urandom(2000))
        assert_one_line_error(dynheads(*base, "--model", bad), "broken.gguf is truncated or damaged")
        bad.write_bytes(b"this is not a gguf file at all")
        assert_one_line_error(dynheads(*base, "--model", bad), "not a GGUF file")
    elif case == "empty_haystack":
        (tmp_path / "hay").mkdir()
        (tmp_path / "hay" / "a.txt").write_text("   ")
        assert_one_line_error(dynheads(*base, "--haystack", tmp_path / "hay"), "no usable text")
    elif case == "too_long":
        proc = dynheads("niah", "--lengths", "8192", "--out", tmp_path / "r")  # no room left for the answer
        assert_one_line_error(proc, "8192 + 48 new tokens is above the model's maximum of 8192 positions")
    elif case == "bad_needles":
        (tmp_path / "n.jsonl").write_text('{"needle": "x"}\n')
        assert_one_line_error(dynheads(*base, "--needles", tmp_path / "n.jsonl"), "line 1")
    elif case == "changed_config":
        out, _ = niah_run
        proc = dynheads("niah", *GRID[:-1], "41", "--out", out)
        assert_one_line_error(proc, "different config", "max_new_tokens")
