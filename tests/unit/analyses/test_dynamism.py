"""Table 1 statistics on hand-made dynamic sets with hand-derived answers."""
import math

import numpy as np
import pytest

from dynheads.analyses.dynamism import (DynamismConfig, activation_frequency, dynamism_stats, format_table,
                                           load_head_scores, most_variable_heads, save_head_scores, span_hits,
                                           static_cap_note, top_heads, wu_sample_scores)
from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.records import Records
from dynheads.scores.base import get_score


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


def test_static_top_k_is_capped_at_the_heads_that_ever_scored():
    active = _steps({0, 5}, {0}, {3})  # 3 of 6 heads ever active
    static = top_heads(activation_frequency(active), 5)
    assert np.flatnonzero(static).tolist() == [0, 3, 5]  # never padded with idle heads 1, 2, 4
    st = dynamism_stats(active, np.array(["a"] * 3), static, DynamismConfig(static_top=5))
    assert st.static_requested == 5 and len(st.static_heads) == 3 and st.ln_static_top == pytest.approx(math.log(3))
    assert "capped at 3 (asked for top-5" in format_table(st, "tiny")
    full = dynamism_stats(active, np.array(["a"] * 3), top_heads(activation_frequency(active), 3),
                          DynamismConfig(static_top=3))
    assert "capped" not in format_table(full, "tiny") and static_cap_note(3, 3) == ""


def test_wu_score_counts_hits_on_the_answer_span_it_divides_by():
    # one sample, 4 steps, needle sentence = positions 10..19, answer (real_needle) = 15..17 (3 tokens)
    pos = np.zeros((4, 1, 2), np.int64)
    tok = np.zeros((4, 1, 2), np.int64)
    generated = np.array([7, 8, 9, 4])
    pos[:, 0, 0] = [12, 16, 11, 13]  # head 0 copies at every step, but only step 1 from the answer
    pos[:, 0, 1] = [0, 0, 17, 0]  # head 1 copies once, from the answer
    tok[:, 0, 0], tok[2, 0, 1] = generated, 9
    records = Records({"top1_pos": pos, "top1_token": tok, "token_id": generated, "score": np.zeros((4, 1, 2))},
                      np.array(["a"] * 4), np.arange(4))
    spans = {"a": {"needle": [[10, 20]], "answer": [[15, 18]]}}
    score = get_score("copy_paste")
    needle = span_hits(score, records, spans, "needle")
    answer = span_hits(score, records, spans, "answer")
    assert needle.sum(0).tolist() == [[4, 1]] and answer.sum(0).tolist() == [[1, 1]]
    wu = wu_sample_scores(answer, records.sample_ids, {"a": 3}, {"a": True})
    np.testing.assert_allclose(wu["a"], [[1 / 3, 1 / 3]])
    # the old mix (needle hits / answer length) gave head 0 a "recall" of 4/3 > 1
    assert wu_sample_scores(needle, records.sample_ids, {"a": 3}, {"a": True})["a"][0, 0] > 1
