"""Head policies on hand-made inputs; the predicted-vs-static verdict; the detection-run overlap refusal."""
import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.experiments.head_policies import build_policy, to_units, top_units
from dynheads.experiments.sparse import SparseConfig, _check_disjoint, conditions, summarise, verdict
from dynheads.runs import RunDir
from dynheads.tracing.tracer import StepView

# 2 layers × 4 query heads, groups of 2 → 2 × 2 KV units
RANKING = np.array([[0.1, 0.9, 0.0, 0.2], [0.5, 0.0, 0.3, 0.8]])


def _view(hidden=None, mass=None):
    arrays = {} if mass is None else {"mass_needle": np.asarray(mass, float)}
    return StepView(0, 5, 0.0, 0.0, arrays, hidden)


def test_unit_scores_are_the_max_over_each_group_and_ties_go_to_the_lower_index():
    np.testing.assert_array_equal(to_units(RANKING, 2), [[0.9, 0.2], [0.5, 0.8]])
    np.testing.assert_array_equal(top_units(np.array([[1.0, 2.0], [2.0, 0.0]]), 2), [[False, True], [True, False]])


def test_full_streaming_and_static():
    full = build_policy("full", shape=(2, 2)).select(0, None, None)
    none = build_policy("streaming", shape=(2, 2)).select(3, None, None)
    static = build_policy("static", k=2, ranking=RANKING, group=2).select(0, None, None)
    assert full.all() and not none.any()
    np.testing.assert_array_equal(static, [[True, False], [False, True]])  # units 0.9 and 0.8


def test_random_draws_k_per_step_seeded_by_sample_and_step():
    pol = build_policy("random", k=2, shape=(2, 2), seed=0, sample_id="s1").select
    draws = [pol(t, None, None) for t in range(8)]
    assert all(d.sum() == 2 for d in draws)
    np.testing.assert_array_equal(draws[3], pol(3, None, None))
    assert len({d.tobytes() for d in draws}) > 1
    other = build_policy("random", k=2, shape=(2, 2), seed=0, sample_id="s2").select
    assert any(not np.array_equal(pol(t, None, None), other(t, None, None)) for t in range(8))


def test_oracle_opens_the_steps_dynamic_set_filled_and_cut_by_score_then_mass():
    active = np.zeros((2, 4), bool)
    active[1, 3] = True  # D_t: query head 3 of layer 1 → unit (1, 1)
    score = np.array([[0.0, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0]])
    mass = np.array([[0.0, 0.6, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0]])
    step = lambda view: (score, active)  # noqa: E731
    pol = build_policy("oracle", k=2, group=2, step_score=step, span="needle")
    assert pol.full_pass_first
    np.testing.assert_array_equal(pol.select(0, None, _view(mass=mass)), [[False, True], [False, True]])
    three = build_policy("oracle", k=3, group=2, step_score=step, span="needle").select(0, None, _view(mass=mass))
    np.testing.assert_array_equal(three, [[False, True], [True, True]])  # then by needle mass: unit (1, 0)
    active[:] = True  # more active units than k: cut by the same keys
    np.testing.assert_array_equal(pol.select(0, None, _view(mass=mass)), [[False, True], [False, True]])


def test_predicted_opens_the_probe_top_k_and_the_static_set_at_step_zero():
    class Probe:
        def predict(self, hidden):
            return np.array([[hidden[0], 0, 0, 0], [0, 0, 0.5, 0]])

    pol = build_policy("predicted", k=1, ranking=RANKING, group=2, predictor=Probe()).select
    np.testing.assert_array_equal(pol(0, None, None), [[True, False], [False, False]])  # static top-1
    np.testing.assert_array_equal(pol(1, _view(hidden=np.array([0.1])), None), [[False, False], [False, True]])
    np.testing.assert_array_equal(pol(1, _view(hidden=np.array([0.9])), None), [[True, False], [False, False]])
    with pytest.raises(ConfigError):
        build_policy("predicted", k=1, ranking=RANKING, group=2, predictor=None)


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
