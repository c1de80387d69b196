"""Bootstrap, paired tests, sample splits and step pairs on hand-made inputs with hand-derived answers."""
import numpy as np
import pytest

from dynheads.errors import DataError
from dynheads.experiments.stats import (ABOVE, BELOW, MIN_PAIRS, NOT_SHOWN, TOO_FEW, bootstrap_ci, bootstrap_metric,
                                        bootstrap_metric_gap, group_sums, offset_pairs, paired_difference,
                                        paired_verdict, previous_observed, split_by_sample)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_bootstrap_ci_of_a_constant_is_a_point():
    ci = bootstrap_ci(np.full(17, 0.5), rng())
    assert (ci.estimate, ci.low, ci.high, ci.n) == (0.5, 0.5, 0.5, 17)


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    small = bootstrap_ci(np.array([0.0, 1.0] * 5), rng())
    large = bootstrap_ci(np.array([0.0, 1.0] * 500), rng())
    assert small.estimate == large.estimate == 0.5
    assert small.low < 0.5 < small.high and large.low < 0.5 < large.high
    assert large.high - large.low < (small.high - small.low) / 5  # width ∝ 1/sqrt(n): 10x narrower
    # normal approximation: half-width ≈ 1.96 * 0.5 / sqrt(1000) = 0.031
    assert (large.high - large.low) / 2 == pytest.approx(0.031, abs=0.005)


def test_bootstrap_ci_is_reproducible_and_rejects_empty():
    v = np.arange(10.0)
    assert bootstrap_ci(v, rng(3)) == bootstrap_ci(v, rng(3))
    with pytest.raises(DataError, match="at least 1"):
        bootstrap_ci(np.array([]), rng())


def test_paired_difference_of_identical_arrays_is_zero_with_p_one():
    a = np.array([0.3, 0.7, 0.1, 0.9])
    d = paired_difference(a, a.copy(), rng())
    assert (d.mean_difference, d.low, d.high, d.p_value, d.n, d.n_nonzero) == (0.0, 0.0, 0.0, 1.0, 4, 0)


def test_paired_difference_of_a_constant_shift_has_a_point_interval():
    b = np.linspace(0, 1, 20)
    d = paired_difference(b + 0.25, b, rng())
    assert d.mean_difference == pytest.approx(0.25)
    assert d.low == pytest.approx(0.25) and d.high == pytest.approx(0.25)
    assert d.p_value < 1e-3 and d.n_nonzero == 20


def test_paired_difference_p_value_is_the_exact_signed_rank_test():
    b = np.zeros(10)
    d = paired_difference(b + np.arange(1, 11), b, rng())  # distinct positive differences, no ties
    assert d.p_value == pytest.approx(2 / 2**10)  # only the all-positive sign pattern is as extreme, two-sided
    assert d.mean_difference == pytest.approx(5.5)


def test_paired_difference_needs_equal_lengths():
    with pytest.raises(DataError, match="equal lengths"):
        paired_difference(np.zeros(3), np.zeros(4), rng())


def test_paired_verdict_needs_the_interval_the_test_and_enough_pairs():
    one = paired_difference(np.array([0.55]), np.array([0.5]), rng())  # interval [+0.05, +0.05], p = 1
    assert paired_verdict(one).outcome == TOO_FEW and paired_verdict(one).n == 1
    five = paired_difference(np.arange(1.0, 6.0), np.zeros(5), rng())  # all positive: p = 2 / 2^5
    assert five.p_value == pytest.approx(0.0625) and five.low > 0 and paired_verdict(five).outcome == TOO_FEW
    six = paired_difference(np.arange(1.0, 7.0), np.zeros(6), rng())  # the fewest pairs p < 0.05 allows at all
    assert six.p_value == pytest.approx(2 / 2**6) and MIN_PAIRS == 10 and paired_verdict(six).outcome == TOO_FEW
    assert paired_verdict(six, min_pairs=6).outcome == ABOVE
    ten = paired_difference(np.zeros(10), np.arange(1.0, 11.0), rng())
    assert paired_verdict(ten).outcome == BELOW
    assert paired_verdict(ten).summary == "-5.500 [-7.300, -3.700], Wilcoxon p = 0.00195, n = 10"
    # interval above zero, but the test does not agree: five large gains, five small losses (ranks 1-5)
    lopsided = paired_difference(np.array([10.0, 11, 12, 13, 14, -1, -1.1, -1.2, -1.3, -1.4]), np.zeros(10), rng())
    assert lopsided.low > 0 and lopsided.p_value > 0.05 and paired_verdict(lopsided).outcome == NOT_SHOWN
    assert paired_verdict(None).outcome == TOO_FEW and paired_verdict(None).n == 0
    assert paired_verdict(ten.__dict__) == paired_verdict(ten)  # the dict stored in result files reads the same
    assert paired_verdict(five).too_few("questions") == "n = 5 questions, fewer than the 10 a paired verdict needs"


def test_group_sums_adds_rows_of_each_sample():
    out = group_sums(np.array([[1.0, 0], [2, 1], [4, 3]]), np.array(["b", "a", "b"]))
    np.testing.assert_array_equal(out, [[2, 1], [5, 3]])  # groups in sorted order: a, b


def _f1(c):
    tp, fp, fn = np.moveaxis(c, -1, 0)
    with np.errstate(invalid="ignore"):  # a resample of only empty rows has no F1
        return 2 * tp / (2 * tp + fp + fn)


def test_bootstrap_metric_gap_of_identical_predictors_is_zero():
    stats = np.array([[3.0, 1, 0], [1, 0, 2], [2, 2, 1], [0, 1, 1]])
    gap = bootstrap_metric_gap(stats, stats.copy(), np.array(["a", "a", "b", "c"]), _f1, rng())
    assert gap.metric_a == gap.metric_b == pytest.approx(0.6)  # tp 6, fp 4, fn 4: 12 / 20
    assert (gap.gap, gap.low, gap.high, gap.excludes_zero, gap.n_samples) == (0.0, 0.0, 0.0, False, 3)


def test_bootstrap_metric_gap_resamples_samples_not_rows():
    # a is perfect; b misses everything in sample "x" only. Sample "x" has 100 rows, "y" one row:
    # resampling samples (2 units) gives gap 0 whenever only "y" is drawn (prob 1/4), so low = 0.
    groups = np.array(["x"] * 100 + ["y"])
    a = np.tile([1.0, 0, 0], (101, 1))
    b = a.copy()
    b[:100] = [0, 0, 1]
    gap = bootstrap_metric_gap(a, b, groups, _f1, rng(), n_boot=4000)
    assert gap.metric_a == 1.0 and gap.metric_b == pytest.approx(2 / 102)
    assert gap.low == 0.0 and not gap.excludes_zero  # a bootstrap over the 101 rows would exclude 0


def test_bootstrap_metric_of_pooled_statistics():
    stats = np.array([[2.0, 0, 0], [0, 0, 0], [2, 2, 0]])
    iv = bootstrap_metric(stats, np.array(["a", "b", "c"]), _f1, rng())
    assert iv.estimate == pytest.approx(8 / 10) and iv.n == 3
    assert iv.low <= iv.estimate <= iv.high and iv.high == 1.0  # resample of only "a" (and "b") is perfect


def test_split_by_sample_keeps_every_sample_in_one_part():
    ids = np.repeat([f"s{i}" for i in range(10)], 3)
    parts = split_by_sample(ids, (0.7, 0.2, 0.1), rng())
    assert [len(set(ids[p])) for p in parts] == [7, 2, 1]
    assert (np.sum(parts, axis=0) == 1).all()
    again = split_by_sample(ids, (0.7, 0.2, 0.1), rng())
    assert all((p == q).all() for p, q in zip(parts, again))
    with pytest.raises(DataError, match="at least 3 samples"):
        split_by_sample(np.array(["a", "b"]), (0.7, 0.2, 0.1), rng())


def test_split_by_sample_gives_each_part_a_sample_when_few():
    ids = np.array(["a", "b", "c"])
    assert [int(p.sum()) for p in split_by_sample(ids, (0.7, 0.2, 0.1), rng())] == [1, 1, 1]


def test_offset_pairs_stay_within_a_sample():
    # rows: a0 a1 a2 b0 b1, deliberately out of order for b
    ids = np.array(["a", "a", "a", "b", "b"])
    steps = np.array([0, 1, 2, 1, 0])
    src, tgt = offset_pairs(ids, steps, 1)
    assert sorted(zip(src.tolist(), tgt.tolist())) == [(0, 1), (1, 2), (4, 3)]
    src, tgt = offset_pairs(ids, steps, 0)
    assert (src == tgt).all() and len(src) == 5
    assert offset_pairs(ids, steps, 3)[0].size == 0
    src, tgt = offset_pairs(ids, steps, -2)
    assert (src.tolist(), tgt.tolist()) == ([2], [0])


def test_previous_observed_is_n_minus_one_at_k0_and_n_beyond():
    ids = np.array(["a"] * 4)
    steps = np.arange(4)
    assert previous_observed(ids, steps, np.arange(4), 0).tolist() == [-1, 0, 1, 2]
    src, tgt = offset_pairs(ids, steps, 2)  # (0, 2), (1, 3): last observed before n+2 is n
    assert previous_observed(ids, steps, tgt, 2).tolist() == src.tolist()
