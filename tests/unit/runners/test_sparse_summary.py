"""The sparse runner's conditions, generators, summary and verdict; the detection-run overlap refusal."""
import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.headsets.base import build
from dynheads.headsets.names import SPARSE
from dynheads.runners.sparse import SparseConfig, _check_disjoint, conditions, step_generators, summarise, verdict
from dynheads.runs import RunDir


def test_random_policy_draws_k_per_step_seeded_by_sample_and_step():
    layout = HeadLayout(2, 4, 2)
    pol = build(SPARSE.get("random"), k=2, unit="kv")
    rng_s1, rng_s2 = step_generators(0, "s1"), step_generators(0, "s1")
    draws = [pol.at(t, layout, rng=rng_s1(t)) for t in range(8)]
    assert all(d.shape == (2, 2) and d.sum() == 2 for d in draws)
    np.testing.assert_array_equal(draws[3], pol.at(3, layout, rng=rng_s2(3)))  # step 3 alone: the same draw
    assert len({d.tobytes() for d in draws}) > 1
    other = step_generators(0, "s2")
    assert any(not np.array_equal(pol.at(t, layout, rng=rng_s1(t)), pol.at(t, layout, rng=other(t))) for t in range(8))


def test_conditions_run_budget_free_policies_once():
    cfg = SparseConfig("det", ("full", "static", "streaming"), (1, 4))
    assert [c[0] for c in conditions(cfg)] == ["full", "static@1", "static@4", "streaming"]
    with pytest.raises(ConfigError, match="unknown head policy"):
        SparseConfig("det", ("full", "psychic"))


def test_summary_adds_oracle_headroom_after_the_predicted_rows():
    """oracle − static rows come after predicted − static; the verdict reads only the predicted ones."""
    acc = {"static@2": [0, 0, 1, 0, 0, 1], "predicted@2": [1, 0, 1, 0, 1, 1], "oracle@2": [1, 1, 1, 1, 1, 1]}
    rows = [{"conditions": {c: {"accuracy": float(v[i]), "rouge_l": float(v[i]) / 2, "kv_read": 0.2}
                            for c, v in acc.items()}} for i in range(6)]
    with_oracle = summarise(rows, SparseConfig("det", ("static", "predicted", "oracle"), (2,), n_boot=500))
    without = summarise(rows, SparseConfig("det", ("static", "predicted"), (2,), n_boot=500))
    assert [(t["a"], t["metric"]) for t in with_oracle["comparisons"]] == [
        ("predicted@2", "accuracy"), ("predicted@2", "rouge_l"), ("oracle@2", "accuracy"), ("oracle@2", "rouge_l")]
    same = ("mean_difference", "p_value", "n", "n_nonzero")  # the bootstrap draws follow the conditions present
    assert [{f: t[f] for f in same} for t in with_oracle["comparisons"][:2]] == \
        [{f: t[f] for f in same} for t in without["comparisons"]]
    oracle = with_oracle["comparisons"][2]
    assert oracle["mean_difference"] == pytest.approx(4 / 6) and oracle["n_nonzero"] == 4
    assert with_oracle["verdict"] == without["verdict"]


def _row(k, lo, hi, p=0.01, n=30):
    return {"metric": "accuracy", "budget": k, "low": lo, "high": hi, "p_value": p, "n": n,
            "mean_difference": (lo + hi) / 2}


def test_verdict_names_the_budgets_where_predicted_wins():
    assert verdict([_row(1, -0.1, 0.2), _row(4, 0.1, 0.3), _row(8, 0.05, 0.2)]).endswith(
        "k = [4, 8] (95% CI of the paired accuracy difference above 0, Wilcoxon p < 0.05 and at least 10 samples), "
        "at every budget from k = 4 on")
    assert verdict([_row(1, -0.3, -0.1)]).startswith("predicted does not beat static")
    assert "static is better at k = [1]" in verdict([_row(1, -0.3, -0.1)])


def test_verdict_needs_the_test_as_well_as_the_interval():
    """One sample where predicted answers and static does not: CI [1, 1], but p = 1 — not a win."""
    assert verdict([_row(16, 1.0, 1.0, 1.0)]).startswith("predicted does not beat static at any budget")
    assert verdict([_row(16, 0.1, 0.5, 0.04), _row(32, 0.1, 0.5, 0.2)]).startswith("predicted beats static at k = [16]")
    assert "from k" not in verdict([_row(16, 0.1, 0.5, 0.04), _row(32, 0.1, 0.5, 0.2)])


def test_verdict_on_too_few_samples_is_not_comparable():
    """Five samples where predicted answers and static does not: interval [1, 1], p = 0.0625: no verdict."""
    acc = {"static@4": [0] * 5, "predicted@4": [1] * 5}
    rows = [{"conditions": {c: {"accuracy": float(v[i]), "rouge_l": 0.0, "kv_read": 0.2} for c, v in acc.items()}}
            for i in range(5)]
    result = summarise(rows, SparseConfig("det", ("static", "predicted"), (4,), n_boot=200))
    assert result["comparisons"][0]["p_value"] == pytest.approx(0.0625) and result["comparisons"][0]["low"] == 1.0
    assert result["verdict"] == "not comparable: n = 5 samples, fewer than the 10 a paired verdict needs"
    assert verdict([_row(4, 1.0, 1.0, 0.002, n=9)]).startswith("not comparable: n = 9 samples")


def test_a_detection_run_with_the_evaluated_samples_is_refused(tmp_path):
    task = {"lengths": [400], "depths": [50.0], "samples_per_cell": 1, "haystack": None, "needles": None, "seed": 0}
    det = RunDir.create(tmp_path / "det", {"kind": "niah", "task": task})
    det.write_sample("niah-400-50-0", {"token_id": np.zeros(1, np.int64)}, {})
    with pytest.raises(ConfigError, match="traced evaluated sample niah-400-50-0"):
        _check_disjoint(det, {**task, "lengths": (400, 800)}, {"niah-400-50-0"})
    _check_disjoint(det, {**task, "seed": 1}, {"niah-400-50-0"})  # another seed: other needles, allowed
