"""`dynheads ablate` and `ablate-progressive` on the default model with short prompts, and their bad input."""
import json
import os
import subprocess

import numpy as np
import pytest

from e2e.helpers import BIN, assert_one_line_error

pytestmark = pytest.mark.e2e
SHORT = ["--max-new-tokens", "16", "--n-boot", "200", "--quiet"]


def _dynheads(*args):
    # One intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes 2 threads ~5x slower.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


def _records(run, sample="niah-300-0-0"):
    with np.load(run / "records" / f"{sample}.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    grid = _dynheads("ablate", "--lengths", "300", "--depths", "0", "--samples-per-cell", "1", *SHORT,
                     "--out", root / "grid")
    assert grid.returncode == 0, grid.stderr
    prog = _dynheads("ablate-progressive", "--length", "300", "--ks", "0,5", "--samples", "1", *SHORT,
                     "--static-ranking", root / "grid" / "detection", "--out", root / "prog")
    assert prog.returncode == 0, prog.stderr
    return root, grid, prog


def test_ablate_writes_results_figures_and_per_condition_records(runs):
    root, grid, _ = runs
    out = root / "grid"
    assert grid.stdout.strip().splitlines()[-1] == str(out)
    assert "paper (llama3.1-8b, Fig. 2)" in grid.stdout and "dynamic - static_excluding_dynamic" in grid.stdout
    result = json.loads((out / "results" / "ablation.json").read_text())
    assert set(result["conditions"]) == {"none", "dynamic", "static", "static_excluding_dynamic", "random"}
    assert len(result["comparisons"]) == 8 and result["static_ranking"]["kind"] == "run"
    assert result["static_ranking"]["path"] == str(out / "detection")
    for name in ("ablation_heatmaps.png", "ablation_heatmaps.svg"):
        assert (out / "figures" / name).stat().st_size > 5_000
    rec = _records(out)
    sample = json.loads((out / "samples" / "niah-300-0-0.json").read_text())
    n = sample["matched_heads"]
    assert result["matching"]["heads"] == n and result["matching"]["scope"] == "run"  # one count for the run
    assert (out / "first_pass" / "samples" / "niah-300-0-0.json").exists() and "count matching:" in grid.stdout
    for cond in ("static", "static_excluding_dynamic", "random"):
        masks = rec[f"{cond}__ablated"]
        assert masks.shape[1:] == (30, 9) and (masks.reshape(len(masks), -1).sum(1) == n).all()
    assert not rec["none__ablated"].any()
    # masking exactly D_t: Eq. 1 on the clean pass of each step
    from dynheads.scores.copy_paste import copy_paste_score

    dyn = {k[len("dynamic__"):]: v for k, v in rec.items() if k.startswith("dynamic__")}
    d_t = copy_paste_score(dyn, sample["token_spans"], generated_key="clean_token_id") > 0.5
    np.testing.assert_array_equal(dyn["ablated"], d_t)
    # resuming a finished run redoes nothing
    before = (out / "samples" / "niah-300-0-0.json").stat().st_mtime_ns
    again = _dynheads("ablate", "--lengths", "300", "--depths", "0", "--samples-per-cell", "1", *SHORT,
                      "--out", out)
    assert again.returncode == 0, again.stderr
    assert (out / "samples" / "niah-300-0-0.json").stat().st_mtime_ns == before


def test_progressive_writes_curve_and_k0_equals_the_unmasked_run(runs):
    root, _, prog = runs
    out = root / "prog"
    assert prog.stdout.strip().splitlines()[-1] == str(out)
    assert "paper (llama3.1-8b, Fig. 3)" in prog.stdout
    result = json.loads((out / "results" / "ablation_progressive.json").read_text())
    assert result["ks"] == [0, 5] and set(result["conditions"]) == {"k0", "k5"}
    from dynheads import load_records

    ever = int((load_records(root / "grid" / "detection").array("score") > 0.5).any(0).sum())
    assert len(result["static_heads"]) == min(20, ever)  # capped at the heads the detection run saw active
    assert bool(result["static_note"]) == (ever < 20) and (result["static_note"] in prog.stdout)
    assert (out / "figures" / "ablation_progressive.png").stat().st_size > 5_000
    prog_rec, grid_rec = _records(out), _records(root / "grid")  # the same sample: same seed, length, depth 0
    for name in ("token_id", "top1_pos", "top1_token"):
        np.testing.assert_array_equal(prog_rec[f"k0__{name}"], grid_rec[f"none__{name}"])
    np.testing.assert_array_equal(prog_rec["k0__masked_top1_pos"], grid_rec["none__top1_pos"])
    assert not prog_rec["k0__ablated"].any()
    masks = prog_rec["k5__ablated"]
    assert (masks.reshape(len(masks), -1).sum(1) == 5).all()


def test_bad_static_ranking_shape_is_one_line_error(tmp_path):
    bad = tmp_path / "head_scores.json"
    bad.write_text(json.dumps({"0-0": [1.0], "1-3": [0.5]}))
    proc = _dynheads("ablate", "--lengths", "300", "--depths", "0", "--samples-per-cell", "1",
                     "--static-ranking", bad, "--out", tmp_path / "x")
    assert_one_line_error(proc, "covers 2 layers × 4 heads; the model has 30 × 9")
    assert not (tmp_path / "x" / "config.json").exists()  # so the corrected command is not "a different config"


def test_k_above_the_number_of_heads_is_one_line_error(tmp_path):
    proc = _dynheads("ablate-progressive", "--length", "300", "--ks", "0,271", "--samples", "1",
                     "--out", tmp_path / "x")
    assert_one_line_error(proc, "k = 271 is outside 0..270")


@pytest.mark.parametrize("args,fragment", [
    (["ablate", "--samples-per-cell", "0"], "invalid value for '--samples-per-cell'"),
    (["ablate", "--match", "median"], "unknown --match 'median'"),
    (["ablate-progressive", "--ks", "0,-5"], "k = -5"),
])
def test_bad_grid_and_flags_fail_before_loading_the_model(tmp_path, args, fragment):
    proc = _dynheads(*args, "--out", tmp_path / "x")
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "x").exists()
