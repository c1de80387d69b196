"""RIND on a constructed draft with hand-derived flagged positions; sentence splitting; registry."""
from __future__ import annotations

import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.rag.trigger import (
    content_mask, max_later_attention, renormalize_per_sentence, rind, sentence_ranges, token_words, triggers,
)
from dynheads.registry import Spec

TOKENS = ["The", " capital", " of", " France", " is", " Paris", "."]
ENTROPY = np.array([2.0, 1.0, 3.0, 0.5, 2.0, 2.5, 0.1])
A_MAX = np.array([0.9, 0.3, 0.8, 0.4, 0.6, 0.4, 0.0])  # max_{j>i} A[j, i] by construction


def _attention():
    a = np.zeros((7, 7))
    for i in range(6):
        a[i + 1, i] = A_MAX[i]  # the largest later attention to token i
        a[6, i] = max(a[6, i], A_MAX[i] / 2)  # a smaller one from the last token
    np.fill_diagonal(a, 0.95)  # self-attention: ignored unless include_self
    a[0, 3] = 5.0  # above the diagonal (a future token): never read
    return a


def test_max_later_attention():
    np.testing.assert_allclose(max_later_attention(_attention()), A_MAX)
    np.testing.assert_allclose(max_later_attention(_attention(), include_self=True),
                               [0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95])


def test_content_mask_uses_whole_words():
    assert content_mask(TOKENS).tolist() == [False, True, False, True, False, True, False]
    assert content_mask(["Par", "is", " is", " the", " capital", " 1990"]).tolist() == [True, True, False, False, True, True]
    assert token_words(["Par", "is", " is", ","]) == [("Paris", 0, 2), ("is", 2, 3)]


def test_rind_paper_semantics_flags_first_content_token_above_threshold():
    # S = H · a_max · s = [0, 0.3, 0, 0.2, 0, 1.0, 0] → first S > 0.5 is " Paris" (index 5)
    d = rind(ENTROPY, _attention(), TOKENS, threshold=0.5, renormalize=False)
    assert (d.retrieve, d.position) == (True, 5)
    np.testing.assert_allclose(d.scores, [0, 0.3, 0, 0.2, 0, 1.0, 0])
    assert rind(ENTROPY, _attention(), TOKENS, threshold=1.1, renormalize=False).retrieve is False


def test_rind_filter_after_triggers_on_stop_words_like_dragin_code():
    # raw H · a = [1.8, 0.3, 2.4, 0.2, 1.2, 1.0, 0]: above 1.1 only stop words (0, 2, 4) → retrieve, position 0
    d = rind(ENTROPY, _attention(), TOKENS, threshold=1.1, renormalize=False, filter_after=True)
    assert (d.retrieve, d.position) == (True, 0)
    # above 0.5: 0, 2, 4, 5 → the first content token among them is 5
    d = rind(ENTROPY, _attention(), TOKENS, threshold=0.5, renormalize=False, filter_after=True)
    assert (d.retrieve, d.position) == (True, 5)


def test_rind_include_self_and_renormalisation():
    # with the diagonal, a_max = 0.95 everywhere → " capital": 1.0 · 0.95 > 0.5 → index 1
    d = rind(ENTROPY, _attention(), TOKENS, threshold=0.5, renormalize=False, include_self=True)
    assert d.position == 1
    # one sentence of 7 tokens, Σ a = 3.4: a' = a · 7 / 3.4 → capital 0.3·7/3.4 = 0.618 > 0.5 → index 1
    d = rind(ENTROPY, _attention(), TOKENS, threshold=0.5, renormalize=True)
    assert d.position == 1 and d.scores[1] == pytest.approx(0.3 * 7 / 3.4)
    assert d.scores[5] == pytest.approx(2.5 * 0.4 * 7 / 3.4)


def test_renormalize_per_sentence():
    a = np.array([0.2, 0.2, 0.0, 0.0, 0.3, 0.1])
    out = renormalize_per_sentence(a, [(0, 2), (2, 4), (4, 6)])
    np.testing.assert_allclose(out, [1.0, 1.0, 0.0, 0.0, 1.5, 0.5])


def test_sentence_ranges():
    toks = ["He", " was", " born", " in", " Paris", ".", " He", " died", " in", " 1990", ".\n",
            "Dr", ".", " Smith", " said", " 3", ".", "5", " so", "!", " "]
    assert sentence_ranges(toks) == [(0, 6), (6, 11), (11, 21)]
    assert sentence_ranges(["No", " end"]) == [(0, 2)]
    assert sentence_ranges(["He", " met", " J", ".", " K", ".", " Rowling", ".", "\n\n", "Then"]) == [(0, 9), (9, 10)]
    assert sentence_ranges([]) == []


def test_registry_and_protocol():
    att = _attention()
    t = triggers.create(Spec("rind", {"threshold": 0.5, "renormalize": False}))
    assert t.should_retrieve(ENTROPY, att, TOKENS).position == 5
    assert triggers.create(Spec("always")).should_retrieve(ENTROPY, att, TOKENS).retrieve is True
    assert triggers.create(Spec("never")).should_retrieve(ENTROPY, att, TOKENS).retrieve is False
    assert triggers.create(Spec("rind")).threshold == 1.2
    with pytest.raises(ConfigError):
        triggers.create(Spec("rind", {"theta": 1.0}))
    with pytest.raises(ValueError):
        rind(ENTROPY[:3], att, TOKENS)


def test_attention_term_is_per_head_max_then_mean_over_heads_as_dragin():
    # 3 tokens, 2 heads. Token 0 gets 0.8 from token 1 in head A and 0.6 from token 2 in head B.
    att = np.zeros((2, 3, 3))
    att[0, 1, 0], att[1, 2, 0] = 0.8, 0.6
    att[0, 2, 1], att[1, 2, 1] = 0.2, 0.4  # token 1: max 0.2 in A, 0.4 in B
    # DRAGIN: mean_h max_j A_h[j, i] = [(0.8 + 0.6) / 2, (0.2 + 0.4) / 2, 0]
    np.testing.assert_allclose(max_later_attention(att), [0.7, 0.3, 0.0])
    # the old order (mean over heads, then max over j) gives max(0.4, 0.3) = 0.4 for token 0
    np.testing.assert_allclose(max_later_attention(att.mean(0)), [0.4, 0.3, 0.0])
    tokens, entropy = ["Paris", " Rome", " Oslo"], np.ones(3)
    assert rind(entropy, att, tokens, threshold=0.5, renormalize=False).position == 0  # 0.7 > 0.5
    assert rind(entropy, att.mean(0), tokens, threshold=0.5, renormalize=False).retrieve is False  # 0.4
    with pytest.raises(ValueError, match="attention"):
        rind(entropy, np.zeros((2, 2, 3, 3)), tokens)
