"""The sparse runner's conditions, generators, summary and verdict; the detection-run overlap refusal."""
from dataclasses import replace

import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.headsets.base import build
from dynheads.headsets.names import SPARSE
from dynheads.report.sparse_figures import sparse_table
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
    assert with_oracle["comparisons"][:2] == without["comparisons"]  # intervals too: one generator per test
    oracle = with_oracle["comparisons"][2]
    assert oracle["mean_difference"] == pytest.approx(4 / 6) and oracle["n_nonzero"] == 4
    assert with_oracle["verdict"] == without["verdict"]


def test_each_in_step_policy_gets_its_verdict_its_gap_closed_and_its_real_budget():
    """query and layerwise are compared with static like predicted; `open_units` is each sample's mean count."""
    n = 12
    acc = {"static@8": [0] * n, "oracle@8": [1] * n, "query@8": [1] * 11 + [0], "layerwise@8": [0] * n}
    rows = [{"conditions": {c: {"accuracy": float(v[i]), "rouge_l": 0.0, "kv_read": 0.2,
                                "opened": [8, 8] if c != "query@8" else [4, 10, 7]} for c, v in acc.items()}}
            for i in range(n)]
    result = summarise(rows, SparseConfig("det", ("static", "oracle", "query", "layerwise"), (8,), n_boot=200))
    assert result["verdicts"]["query"].startswith("query beats static at k = [8]")
    assert result["verdicts"]["layerwise"].startswith("layerwise does not beat static")
    assert result["gap_closed"] == {"query@8": pytest.approx(11 / 12), "layerwise@8": 0.0}
    assert result["conditions"]["query@8"]["open_units"]["estimate"] == pytest.approx(7.0)


def test_a_gap_fraction_over_a_gap_not_shown_is_flagged():
    """With the oracle one sample above static, 'closes +1.00' is noise: the table says the gap is not shown."""
    n = 12
    acc = {"static@8": [0] * n, "oracle@8": [1] + [0] * 11, "query@8": [1] + [0] * 11,
           "static@16": [0] * n, "oracle@16": [1] * n, "query@16": [1] * 6 + [0] * 6}
    rows = [{"conditions": {c: {"accuracy": float(v[i]), "rouge_l": 0.0, "kv_read": 0.2} for c, v in acc.items()}}
            for i in range(n)]
    table = sparse_table(summarise(rows, SparseConfig("det", ("static", "oracle", "query"), (8, 16), n_boot=200)))
    line8 = next(x for x in table.splitlines() if x.startswith("query@8: closes"))
    line16 = next(x for x in table.splitlines() if x.startswith("query@16: closes"))
    assert line8.startswith("query@8: closes +1.00") and "the gap itself is not shown" in line8
    assert line16 == "query@16: closes +0.50 of the oracle − static accuracy gap"


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


def _detection(path, kind, config):
    """A detection run folder as `niah`/`multihop` store it: the resolved task and its input fingerprints."""
    from dataclasses import asdict

    from dynheads.runners.sparse import _task_of

    resolved, files = _task_of(config).inputs(config)
    return RunDir.create(path, {"kind": kind, "task": asdict(resolved), "inputs": files})


def test_a_detection_run_with_the_evaluated_samples_is_refused(tmp_path):
    from dynheads.tasks.niah import NiahConfig

    task = NiahConfig(lengths=(400,), depths=(50.0,), samples_per_cell=1, seed=0)
    det = _detection(tmp_path / "det", "niah", task)
    det.write_sample("niah-400-50-0", {"token_id": np.zeros(1, np.int64)}, {})
    with pytest.raises(ConfigError, match="traced evaluated sample niah-400-50-0"):
        _check_disjoint(det, replace(task, lengths=(400, 800)), {"niah-400-50-0"})
    _check_disjoint(det, replace(task, seed=1), {"niah-400-50-0"})  # another seed: other needles, allowed


def test_the_same_multihop_file_by_a_relative_path_or_a_copy_is_the_same_source(tmp_path, monkeypatch):
    """The detection run stores the resolved path; a relative path (or a copy) to the same file must not slip past."""
    import shutil

    from dynheads.tasks.multihop import MultihopConfig

    data = tmp_path / "data" / "hotpot.jsonl"
    data.parent.mkdir()
    data.write_text('{"_id": "q1"}\n{"_id": "q2"}\n')  # only its path and content matter here
    det = _detection(tmp_path / "det", "multihop", MultihopConfig(str(data), 3))
    det.write_sample("q2", {"token_id": np.zeros(1, np.int64)}, {})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="traced evaluated sample q2"):
        _check_disjoint(det, MultihopConfig("data/hotpot.jsonl", 3), {"q2"})
    shutil.copy(data, tmp_path / "copy.jsonl")
    with pytest.raises(ConfigError, match="traced evaluated sample q2"):
        _check_disjoint(det, MultihopConfig("copy.jsonl", 3), {"q2"})
    (tmp_path / "other.jsonl").write_text(data.read_text().splitlines()[0] + "\n")
    _check_disjoint(det, MultihopConfig("other.jsonl", 3), {"q2"})  # other data: its ids are other questions


def test_each_interval_and_test_has_its_own_generator():
    """Adding a condition (oracle) moves no interval of the others: each draws from its own seed."""
    acc = {"static@2": [0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1], "predicted@2": [1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1],
           "oracle@2": [1] * 12}
    rows = [{"conditions": {c: {"accuracy": float(v[i]), "rouge_l": float(v[i]) / 2, "kv_read": 0.2}
                            for c, v in acc.items()}} for i in range(12)]
    with_oracle = summarise(rows, SparseConfig("det", ("static", "predicted", "oracle"), (2,), n_boot=300))
    without = summarise(rows, SparseConfig("det", ("static", "predicted"), (2,), n_boot=300))
    assert with_oracle["comparisons"][:2] == without["comparisons"]
    for cond in ("static@2", "predicted@2"):
        assert with_oracle["conditions"][cond] == without["conditions"][cond]
