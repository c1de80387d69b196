"""Eq. 2 reasoning retrieval score on hand-made masses and attention rows."""
from __future__ import annotations

import numpy as np
import pytest

from dynheads.scores.reasoning import (
    ACTIVE_THRESHOLD, LOCAL_WINDOW, SINK_POSITIONS, active_heads, denominator_mask, reasoning_score,
    reasoning_score_from_rows,
)


def test_defaults_are_the_documented_third_party_choices():
    assert (SINK_POSITIONS, LOCAL_WINDOW, ACTIVE_THRESHOLD) == (4, 32, 0.1)


def test_ratio_shape_dtype_and_zero_guard():
    num = np.array([[[0.2, 0.0], [0.5, 0.3]], [[0.1, 0.04], [0.0, 0.0]]])  # [T=2, L=2, H=2]
    den = np.array([[[0.4, 0.0], [0.5, 0.6]], [[0.8, 0.5], [0.0, 0.2]]])
    s = reasoning_score(num, den)
    assert s.dtype == np.float32 and s.shape == (2, 2, 2)
    np.testing.assert_allclose(s, [[[0.5, 0.0], [1.0, 0.5]], [[0.125, 0.08], [0.0, 0.0]]], rtol=1e-6)
    assert not np.isnan(s).any()
    np.testing.assert_array_equal(active_heads(s), s > 0.1)
    assert active_heads(s).sum() == 4  # 0.5, 1.0, 0.5, 0.125
    with pytest.raises(ValueError):
        reasoning_score(num, den[0])


def test_active_heads_threshold_is_strict():
    s = np.array([0.1, 0.1000001, 0.0999])
    assert active_heads(s).tolist() == [False, True, False]
    assert active_heads(s, threshold=0.05).tolist() == [True, True, True]


def test_denominator_mask():
    assert denominator_mask(10, sink=2, local=3).tolist() == [False, False] + [True] * 5 + [False] * 3
    assert not denominator_mask(30).any()  # 4 sinks + 32 local cover a 30-token sequence
    assert denominator_mask(40).sum() == 4
    assert denominator_mask(8, sink=0, local=0).all()


def test_score_from_rows_matches_hand_value():
    # 12 keys, sink 2, local 3: denominator over positions 2..8; support = positions 4, 5
    row = np.array([0.30, 0.05, 0.05, 0.05, 0.10, 0.10, 0.05, 0.05, 0.05, 0.05, 0.05, 0.10])
    support = np.zeros(12, dtype=bool)
    support[[4, 5]] = True
    # numerator 0.2; denominator 0.05+0.05+0.10+0.10+0.05+0.05+0.05 = 0.45
    got = reasoning_score_from_rows(row[None, None, :], support, sink=2, local=3)
    assert got.shape == (1, 1)
    assert got[0, 0] == pytest.approx(0.2 / 0.45, rel=1e-6)
    assert reasoning_score_from_rows(row, support, sink=12, local=0) == 0.0


def test_every_registered_score_calls_a_head_active_only_where_it_exceeds_its_threshold():
    from dynheads.scores.base import get_score

    reasoning, copy = get_score("reasoning"), get_score("copy_paste")
    assert reasoning.active(np.array([0.1, 0.1001, 0.05])).tolist() == [False, True, False]  # 0.1 does not exceed 0.1
    np.testing.assert_array_equal(reasoning.active(np.array([0.1, 0.2])), active_heads(np.array([0.1, 0.2])))
    assert copy.threshold == 0.5 and copy.active(np.array([0.0, 1.0])).tolist() == [False, True]
