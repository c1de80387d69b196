"""`dynheads sparse` on the default model: two policies × two budgets on a short prompt, and its refusal."""
import json
import os
import subprocess

import numpy as np
import pytest

from dynheads.analyses.probes import Probe

from e2e.helpers import BIN, assert_one_line_error

pytestmark = pytest.mark.e2e
SHORT = ["--max-new-tokens", "16", "--quiet"]
SINK, RECENT = 16, 64


def _dynheads(*args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    det = _dynheads("niah", "--lengths", "400", "--depths", "0,100", "--samples-per-cell", "1", "--seed", "1", *SHORT,
                    "--out", root / "det")
    assert det.returncode == 0, det.stderr
    run = _dynheads("sparse", "--detection", root / "det", "--policies", "full,streaming,static,random,oracle,predicted",
                    "--budgets", "4",
                    "--lengths", "400", "--depths", "50", "--samples-per-cell", "1", "--n-boot", "200", *SHORT,
                    "--out", root / "sparse")
    assert run.returncode == 0, run.stderr
    return root, run


def test_sparse_writes_conditions_kv_read_tests_and_figure(runs):
    root, proc = runs
    out = root / "sparse"
    assert proc.stdout.strip().splitlines()[-1] == str(out) and "verdict:" in proc.stdout
    result = json.loads((out / "results" / "sparse.json").read_text())
    assert set(result["conditions"]) == {"full", "streaming", "static@4", "random@4", "oracle@4", "predicted@4"}
    assert [(t["a"], t["metric"]) for t in result["comparisons"]] == \
        [(f"{p}@4", m) for p in ("predicted", "oracle") for m in ("accuracy", "rouge_l")]
    assert (out / "predictor.pt").exists() and result["predictor"]["detection"] == str(root / "det")
    assert (out / "figures" / "sparse_accuracy_vs_kv.png").stat().st_size > 5_000
    sample = json.loads((out / "samples" / "niah-400-50-0.json").read_text())
    prompt = sample["prompt_tokens"]
    probe = sum(p.numel() for p in Probe.load(out / "predictor.pt").model.parameters())  # read once per step
    with np.load(out / "records" / "niah-400-50-0.npz") as z:
        for cond, k in (("static@4", 4), ("predicted@4", 4), ("random@4", 4), ("oracle@4", 4)):
            opened = z[f"{cond}__open"]
            n_steps = sample["conditions"][cond]["n_steps"]
            assert len(opened) in (n_steps, n_steps + 1)  # every step that ran: the answer's and the stop step
            assert opened.shape[1:] == (30, 3) and (opened.reshape(len(opened), -1).sum(1) == k).all()
            # every step: k KV heads read all n keys, the other 90 − k read S + W; the predicted policy also
            # reads its probe's weights (against 2 · 30 layers · 3 KV heads · 64 channels per cached key)
            cost = probe if cond.startswith("predicted") else 0
            expected = np.mean([(k * n + (90 - k) * (SINK + RECENT)) / (90 * n) + cost / (2 * 90 * 64 * n)
                                for n in prompt + np.arange(len(opened))])
            assert sample["conditions"][cond]["kv_read"] == pytest.approx(expected)
            assert len(z[f"{cond}__token_id"]) == sample["conditions"][cond]["n_steps"]
        assert (z["static@4__open"] == z["static@4__open"][0]).all()  # the same heads at every step
        # the oracle's real step score (copy-paste on the needle, from the step's own dense pass) moves its heads
        assert len({o.tobytes() for o in z["oracle@4__open"]}) > 1
        assert not z["streaming__open"].any() and z["full__open"].all()
    assert sample["conditions"]["full"]["kv_read"] == 1.0
    assert sample["conditions"]["streaming"]["kv_read"] < sample["conditions"]["static@4"]["kv_read"]


def test_a_detection_run_of_the_same_samples_is_refused(runs):
    root, _ = runs
    proc = _dynheads("sparse", "--detection", root / "det", "--policies", "static", "--budgets", "4",
                     "--lengths", "400", "--depths", "0", "--samples-per-cell", "1", "--seed", "1", *SHORT,
                     "--out", root / "bad")
    assert_one_line_error(proc, "traced evaluated sample niah-400-0-0")


def test_sparse_runs_on_multi_needle_niah(runs):
    """RULER-style multikey prompts are a task for `sparse` too: the single-needle detection run ranks the heads."""
    root, _ = runs
    out = root / "multikey"
    proc = _dynheads("sparse", "--detection", root / "det", "--policies", "full,static", "--budgets", "16",
                     "--lengths", "400", "--depths", "50", "--samples-per-cell", "1", "--num-needles", "2",
                     "--mode", "multikey", "--n-boot", "200", *SHORT, "--out", out)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"]["num_needles"] == 2 and cfg["task"]["mode"] == "multikey"
    (sample_file,) = (out / "samples").glob("*.json")
    sample = json.loads(sample_file.read_text())
    assert {"needle", "needle_0", "needle_1"} <= set(sample["token_spans"])
    assert set(sample["conditions"]) == {"full", "static@16"}
    assert sample["conditions"]["full"]["kv_read"] == 1.0
    result = json.loads((out / "results" / "sparse.json").read_text())
    assert result["n_samples"] == 1 and set(result["conditions"]) == {"full", "static@16"}


def test_a_resumed_run_whose_detection_ranking_changed_is_refused(runs):
    """The detection folder lost (or gained) a sample: another static ranking, so the resumed run must not mix two."""
    import shutil

    root, _ = runs
    det = root / "det-changing"
    shutil.copytree(root / "det", det)
    args = ["sparse", "--detection", det, "--policies", "static", "--budgets", "4", "--lengths", "400", "--depths",
            "50", "--samples-per-cell", "1", "--n-boot", "50", *SHORT, "--out", root / "resumed"]
    assert _dynheads(*args).returncode == 0
    for f in [*(det / "samples").glob("niah-400-0-*"), *(det / "records").glob("niah-400-0-*")]:
        f.unlink()
    assert_one_line_error(_dynheads(*args), "static_ranking")


def test_the_in_step_policies_decide_inside_the_step_and_pay_for_the_decision(runs):
    """`query` is fitted and calibrated on the detection prompts (scorer and thresholds saved), opens a varying
    number of KV heads per step and layer, and pays for its page summaries and refined pages in the KV read; `layerwise` fits its probe after layer 2 on
    the detection prompts, opens exactly k units per step (static in layers 0..2) and pays for the probe's
    weights; the oracle − static gap each closes is reported."""
    root, _ = runs
    out = root / "query"
    proc = _dynheads("sparse", "--detection", root / "det", "--policies", "static,oracle,query,layerwise",
                     "--probe-layer", "2", "--budgets", "8",
                     "--lengths", "400", "--depths", "50", "--samples-per-cell", "1", "--n-boot", "50", *SHORT,
                     "--out", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results" / "sparse.json").read_text())
    saved = json.loads((out / "query_thresholds.json").read_text())
    assert saved["samples"] == 2 and saved["steps"] > 0 and result["query_thresholds"] == saved["thresholds"]
    scorer = saved["scorer"]  # fitted on the detection prompts: base rate, refined pull, centred pull
    assert scorer["refine"] == 4 and len(scorer["weights"]) == 3 and np.shape(scorer["prior"]) == (30, 3)
    sample = json.loads((out / "samples" / "niah-400-50-0.json").read_text())
    with np.load(out / "records" / "niah-400-50-0.npz") as z:
        opened = z["query@8__open"]
    assert opened.shape[1:] == (30, 3)
    prompt = sample["prompt_tokens"]
    keys = [(o.sum() * n + (90 - o.sum()) * (SINK + RECENT)) / (90 * n) for o, n in zip(opened, prompt + np.arange(len(opened)))]
    # page summaries of the far keys, then the keys of each query head's 4 best pages (3 query heads per KV head)
    decision = [((n - RECENT + 15) // 16 - SINK // 16 + 4 * 3 * 16 / 2) / n for n in prompt + np.arange(len(opened))]
    assert sample["conditions"]["query@8"]["kv_read"] == pytest.approx(np.mean(np.add(keys, decision)))
    assert "query@8" in result["gap_closed"] and "layerwise@8" in result["gap_closed"]
    assert "query@8: closes" in proc.stdout or "query@8: no oracle" in proc.stdout
    probe = Probe.load(out / "layer_probe.pt")
    assert probe.meta["layer"] == 2 and probe.shape == (27, 9) and probe.arch["sizes"] == []  # linear, layers 3..29
    assert probe.task == "regress" and probe.meta["fit"] == "ridge"  # P(active) on one scale for every head
    assert result["layer_probe"]["layer"] == 2 and result["layer_probe"]["samples"] == 2
    with np.load(out / "records" / "niah-400-50-0.npz") as z:
        opened, static = z["layerwise@8__open"], z["static@8__open"]
    assert (opened.reshape(len(opened), -1).sum(1) == 8).all() and (opened[:, :3] == static[0, :3]).all()
    params = sum(p.numel() for p in probe.model.parameters())
    keys = [(8 * n + 82 * (SINK + RECENT)) / (90 * n) + params / (2 * 90 * 64 * n) for n in prompt + np.arange(len(opened))]
    assert sample["conditions"]["layerwise@8"]["kv_read"] == pytest.approx(np.mean(keys))
