"""Multi-needle NIAH on the default model through the CLI: trace, per-needle heads, DuoAttention export."""
import json

import numpy as np
import pytest

from dynheads.analyses.needles import needle_index
from dynheads.records import load_records
from e2e.helpers import assert_one_line_error, dynheads

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def multikey_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mk2"
    proc = dynheads("niah", "--model", "default", "--lengths", "500", "--depths", "0,100", "--samples-per-cell", "1",
                    "--num-needles", "2", "--mode", "multikey", "--max-new-tokens", "40", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_multikey_run_records_each_needle_and_which_needle_each_head_copies(multikey_run):
    out = multikey_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"]["num_needles"] == 2 and cfg["task"]["mode"] == "multikey"
    assert {"needle", "needle_0", "needle_1"} <= set(cfg["trace"]["mass_spans"])
    rec = load_records(out)
    for sid, part in rec.by_sample().items():
        r = json.loads((out / "samples" / f"{sid}.json").read_text())
        assert r["token_spans"]["needle"] == r["token_spans"]["needle_0"] and len(r["needle_found"]) == 2
        assert r["accuracy"] == r["needle_found"][0]
        np.testing.assert_array_equal(part.array("needle_index"), needle_index(part.arrays, _spans(out, sid), 2))
        # the run's Eq. 1 score (span "needle" = needle_0) is exactly "copies from needle_0"
        np.testing.assert_array_equal(part.array("score") == 1, part.array("needle_index") == 0)
        assert part.array("mass_needle_0").shape == part.array("top1_pos").shape


def test_dynamism_answers_per_needle_and_export_heads_writes_a_duo_tsv(multikey_run, tmp_path):
    out = multikey_run
    proc = dynheads("dynamism", out)
    assert proc.returncode == 0, proc.stderr
    assert "multi-needle (multikey, 2 needles, 2 samples" in proc.stdout
    assert "different heads for different needles? " in proc.stdout
    stats = json.loads((out / "results" / "needles.json").read_text())
    rec = load_records(out)
    values = np.concatenate([needle_index(part.arrays, _spans(out, sid), 2, "value") for sid, part in rec.by_sample().items()])
    assert stats["part"] == "value" and stats["copy_events"] == [int((values == 0).sum()), int((values == 1).sum())]
    assert dynheads("dynamism", out, "--needle-part", "needle").returncode == 0
    stats, index = json.loads((out / "results" / "needles.json").read_text()), rec.array("needle_index")
    assert stats["part"] == "needle" and stats["copy_events"] == [int((index == 0).sum()), int((index == 1).sum())]
    assert ((values >= 0) <= (index == values)).all()  # a value copy is a copy from the same needle's sentence
    assert (out / "figures" / "needle_heads.png").stat().st_size > 5_000
    proc = dynheads("export-heads", out, "--format", "duo", "--top", "10", "--out", tmp_path / "duo")
    assert proc.returncode == 0, proc.stderr
    gates = np.loadtxt(tmp_path / "duo" / "full_attention_heads.tsv", delimiter="\t")
    assert gates.shape == (30, 3) and 4 <= gates.sum() <= 10 and set(gates.ravel()) <= {0.0, 1.0}


def test_bad_multi_needle_options_are_one_line_errors(tmp_path):
    assert_one_line_error(dynheads("niah", "--mode", "multivalue", "--out", tmp_path / "r"), "--mode needs --num-needles")
    assert_one_line_error(dynheads("niah", "--lengths", "300", "--num-needles", "2", "--mode", "multiquery",
                                   "--out", tmp_path / "r"), "unknown --mode 'multiquery'")


def _spans(out, sid):
    r = json.loads((out / "samples" / f"{sid}.json").read_text())
    return {k: [tuple(s) for s in v] for k, v in r["token_spans"].items()}
