"""Table 1 statistics on hand-made dynamic sets with hand-derived answers."""
import math

import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.experiments.dynamism import (DynamismConfig, activation_frequency, dynamism_stats, load_head_scores,
                                           most_variable_heads, save_head_scores, top_heads, wu_sample_scores)
from dynheads.heads import HeadLayout


def _steps(*sets, shape=(2, 3)):
    out = np.zeros((len(sets),) + shape, bool)
    for t, s in enumerate(sets):
        for flat in s:
            out[t].reshape(-1)[flat] = True
    return out


def test_adjacent_and_static_jaccard():
    active = _steps({0, 1}, {1, 2})
    static = _steps({0, 1})[0]
    st = dynamism_stats(active, np.array(["a", "a"]), static)
    assert st.adjacent_jaccard == pytest.approx(1 / 3)
    assert st.jaccard_static == pytest.approx((1.0 + 1 / 3) / 2)
    assert st.heads_per_step_mean == 2 and st.heads_per_step_sd == 0
    assert st.heads_ever_active == 3 and st.total_heads == 6


def test_entropy_of_twenty_equally_used_heads_is_ln20():
    active = np.zeros((20, 4, 8), bool)
    for t in range(20):
        active[t].reshape(-1)[t] = True
    st = dynamism_stats(active, np.array(["s"] * 20), top_heads(activation_frequency(active), 20))
    assert st.entropy == pytest.approx(math.log(20))
    assert st.ln_static_top == pytest.approx(math.log(20))
    assert st.effective_heads == pytest.approx(20)


def test_empty_steps_skip_versus_keep_and_sample_boundaries():
    active = _steps({0}, set(), {0}, {1}, {1})
    ids = np.array(["a", "a", "a", "b", "b"])
    static = _steps({0})[0]
    skip = dynamism_stats(active, ids, static)
    assert skip.n_steps_without_heads == 1
    assert skip.jaccard_static == pytest.approx(2 / 4)  # steps {0},{0},{1},{1}
    assert skip.adjacent_jaccard == pytest.approx(1.0)  # only the pair ({1},{1}) in b has both non-empty
    keep = dynamism_stats(active, ids, static, DynamismConfig(empty_steps="keep"))
    assert keep.jaccard_static == pytest.approx(2 / 5)
    assert keep.adjacent_jaccard == pytest.approx((0 + 0 + 1) / 3)
    per = dynamism_stats(active, ids, static, DynamismConfig(per_sample=True))
    assert per.jaccard_static == pytest.approx((1.0 + 0.0) / 2)
    with pytest.raises(ConfigError):
        dynamism_stats(active, ids, static, DynamismConfig(empty_steps="maybe"))


def test_static_ranking_wu_scores_and_variable_heads():
    active = _steps({0, 5}, {0}, {0, 5}, {3})
    np.testing.assert_allclose(activation_frequency(active).reshape(-1), [0.75, 0, 0, 0.25, 0, 0.5])
    assert np.flatnonzero(top_heads(activation_frequency(active), 2)).tolist() == [0, 5]
    wu = wu_sample_scores(active, np.array(["a", "a", "b", "b"]), {"a": 4, "b": 2}, {"a": True, "b": False})
    assert list(wu) == ["a"] and wu["a"].reshape(-1).tolist() == [0.5, 0, 0, 0, 0, 0.25]
    assert most_variable_heads(active, 2).tolist() == [5, 0]  # var 0.25 (head 5), then 0.1875 (heads 0 and 3 tie → 0)


def test_head_score_files_round_trip_and_reject_foreign_heads(tmp_path):
    layout = HeadLayout(2, 3, 1)
    scores = {"s1": np.arange(6.0).reshape(2, 3), "s2": np.ones((2, 3))}
    save_head_scores(tmp_path / "h.json", layout, scores)
    np.testing.assert_allclose(load_head_scores(tmp_path / "h.json", layout), (np.arange(6.0).reshape(2, 3) + 1) / 2)
    (tmp_path / "bad.json").write_text('{"7-1": [0.5]}')
    with pytest.raises(ConfigError, match="does not exist in a model with 2 layers"):
        load_head_scores(tmp_path / "bad.json", layout)
