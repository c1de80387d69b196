"""Per-needle head statistics on hand-made arrays with hand-derived answers."""
import numpy as np
import pytest

from dynheads.experiments.needles import needle_head_stats, needle_index

LABELS = ["L0-H0", "L0-H1", "L0-H2", "L0-H3"]


def test_needle_index_is_the_copy_condition_per_needle_span():
    spans = {"needle_0": [(10, 12)], "needle_1": [(20, 22)], "needle": [(10, 12)]}
    arrays = {"top1_pos": np.array([[[10, 20, 5]], [[11, 21, 21]]]),  # [T=2, L=1, H=3]
              "top1_token": np.array([[[7, 7, 7]], [[8, 9, 8]]]), "token_id": np.array([7, 8])}
    # step 0: H0 copies from needle_0, H1 from needle_1, H2 looks outside; step 1: H1 holds another token
    np.testing.assert_array_equal(needle_index(arrays, spans, 2), [[[0, 1, -1]], [[0, -1, 1]]])
    values = {"value_0": [(11, 12)], "value_1": [(20, 21)]}  # only position 11 of needle_0 and 20 of needle_1
    np.testing.assert_array_equal(needle_index(arrays, values, 2, "value"), [[[-1, 1, -1]], [[0, -1, -1]]])


def _sample(*steps, n_heads=4):
    """One sample's needle_index [T, 1, H] from per-step {head: needle} dicts."""
    out = np.full((len(steps), 1, n_heads), -1, np.int8)
    for t, step in enumerate(steps):
        for h, i in step.items():
            out[t, 0, h] = i
    return out


# needle_0 copied at steps 0 ({H0, H1}) and 1 ({H0, H2}); needle_1 at steps 2 ({H1, H3}) and 3 ({H1})
DIFFERENT = _sample({0: 0, 1: 0}, {0: 0, 2: 0}, {1: 1, 3: 1}, {1: 1}, {})


def test_jaccards_counts_and_verdict_on_hand_made_samples():
    index = np.concatenate([DIFFERENT] * 10)
    ids = np.repeat(list("abcdefghij"), len(DIFFERENT))
    found = {"a": [1, 0], "b": [1, 1], "c": [0, 0], "d": [1, 0], "e": [1, 1], "f": [0, 0], "g": [1, 0], "h": [1, 1],
             "i": [0, 0], "j": [1, 0]}
    stats = needle_head_stats(index, ids, 2, LABELS, "multivalue", found)
    # whole run: needle_0 served by {H0, H1, H2}, needle_1 by {H1, H3} → J = 1/4
    assert stats.pooled_jaccard == [[1.0, 0.25], [0.25, 1.0]]
    # consecutive copying steps 0→1 and 2→3 stay on a needle: J = 1/3 and 1/2 → 5/12; 1→2 switches: J = 0
    assert stats.within == pytest.approx(5 / 12) and stats.between == 0.0 and stats.lags == (1.0, 1.0)
    assert stats.n_eligible == 10 and stats.difference["mean_difference"] == pytest.approx(5 / 12)
    assert stats.difference["p_value"] == pytest.approx(2 / 2**10) and stats.verdict.startswith("yes")  # exact Wilcoxon
    assert stats.copy_events == [40, 30] and stats.steps_with_copy == [20, 20]
    assert stats.recall == [pytest.approx(0.7), pytest.approx(0.3)]  # 7 and 3 of 10
    assert stats.top_heads[0] == [("L0-H0", 20), ("L0-H1", 10), ("L0-H2", 10)]
    assert stats.top_heads[1] == [("L0-H1", 20), ("L0-H3", 10)]
    # the same gap on 6 samples: interval above zero and Wilcoxon p = 2 / 2^6 < 0.05, but fewer than 10 pairs
    six = needle_head_stats(index[:30], ids[:30], 2, LABELS)
    assert six.difference["low"] > 0 and six.difference["p_value"] == pytest.approx(2 / 64)
    assert six.verdict == "not comparable: n = 6 eligible samples, fewer than the 10 a paired verdict needs"
    assert np.array(stats.counts).shape == (2, 4)


def test_same_heads_for_both_needles_is_not_shown_and_too_few_samples_not_comparable():
    same = _sample({0: 0, 1: 0}, {0: 0, 1: 0}, {}, {0: 1, 1: 1, 2: 0})  # step 3: two heads on needle_1 win
    one_needle = _sample({0: 0}, {0: 0, 1: 1})  # no switch: not eligible (step 1 is needle_0's by the tie)
    index = np.concatenate([same] * 3 + [one_needle])
    ids = np.repeat(["a", "b", "c", "d"], [4, 4, 4, 2])
    stats = needle_head_stats(index, ids, 2, LABELS)
    assert stats.within == 1.0 and stats.between == 1.0 and stats.n_eligible == 3 and stats.lags == (1.0, 2.0)
    assert stats.verdict.startswith("not comparable: n = 3 eligible") and stats.recall == [None, None]
    ten = needle_head_stats(np.concatenate([same] * 10), np.repeat(list("abcdefghij"), 4), 2, LABELS)
    assert ten.difference["p_value"] == 1.0 and ten.verdict.startswith("not shown")
    none = needle_head_stats(one_needle, np.repeat(["d"], 2), 2, LABELS)
    assert none.n_eligible == 0 and none.difference is None and none.verdict.startswith("not comparable: n = 0")
