"""When to retrieve: RIND (DRAGIN's real-time information-need detection), always, never.

RIND (Su et al. 2024, DRAGIN; used by paper Sec. 5, Alg. 1 step 2.2) scores each drafted token
    S_i = H_i · a_max(i) · s_i,   a_max(i) = mean_h max_{j > i} A_h[j, i]
with H_i the entropy of the distribution that produced token i, A_h the attention of head h among the
generated tokens (the caller passes every head of the last layer) and s_i = 0 for stop words, and flags
the first token with S_i > θ. The attention term is DRAGIN's (anchors §2.3): per head the largest
attention a later token pays to token i, then the mean over heads (not the max of the head-averaged
attention, which is never larger and would put DRAGIN's θ on another scale). Defaults follow the paper's formula (strict j > i, stop words removed
before the decision), except `renormalize`, which follows DRAGIN's released code (attention rescaled
to mean 1 inside each sentence) because its shipped θ values only mean something on that scale.
`filter_after=True` and `include_self=True` give DRAGIN-code behaviour (see anchors §2.3).

Defaults where the paper (Lin et al.) is silent:
  threshold 1.2   DRAGIN config for HotpotQA with Llama-2-13b-chat and vicuna-13b (anchors §2.3;
                  Llama-2-7b uses 0.8); θ is a per-(model, dataset) knob.
  stop words      scikit-learn's ENGLISH_STOP_WORDS (DRAGIN uses spaCy POS tags; no spaCy here).
Tokens are scored one by one (DRAGIN merges sub-tokens into words); a token is a content token when
any word it overlaps is not a stop word, so the pieces of "Par"+"is" share the word "Paris".
The attention rows come from the pass that generated the draft (softmax over the whole prompt, restricted
to the draft's tokens); DRAGIN re-encodes the generated text alone. We keep the generating pass (one
prefill, no second encoding); with `renormalize` (per-sentence mean 1) the two differ only in how the
non-draft mass is spread, which the rescaling divides out per sentence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from dynheads.registry import Registry

TokenSpan = tuple[int, int]  # [start, end) in generated-token indices

DEFAULT_THRESHOLD = 1.2  # DRAGIN HotpotQA config (13B models); paper silent
_WORD = re.compile(r"[^\W_]+")
_SENT_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|\n+")
_ABBREV = frozenset("mr mrs ms dr st jr sr vs etc inc ltd co no prof gen col lt mt ft sgt capt".split())


@dataclass(frozen=True)
class TriggerDecision:
    """Whether to retrieve, the first flagged generated token, and the per-token scores used [T]."""

    retrieve: bool
    position: int | None = None
    scores: np.ndarray | None = None


class Trigger(Protocol):
    def should_retrieve(self, entropy: np.ndarray, attention: np.ndarray,
                        tokens: Sequence[str]) -> TriggerDecision:
        """entropy [T] (nats), attention [heads, T, T] or [T, T] (row j: token j over the generated tokens), tokens [T]."""


triggers: Registry[Callable[..., Trigger]] = Registry("trigger")


@triggers.register("rind")
@dataclass(frozen=True)
class RindTrigger:
    """RIND with the module's defaults; each field is a choice the paper leaves open."""

    threshold: float = DEFAULT_THRESHOLD  # θ; DRAGIN HotpotQA config
    renormalize: bool = True  # DRAGIN code: a_i / Σ_sentence a × sentence length; paper formula: False
    include_self: bool = False  # DRAGIN code takes the max over j ≥ i (diagonal included); paper: j > i
    filter_after: bool = False  # DRAGIN code drops stop words after deciding; paper: before (s_i in S_i)

    def should_retrieve(self, entropy: np.ndarray, attention: np.ndarray,
                        tokens: Sequence[str]) -> TriggerDecision:
        return rind(entropy, attention, tokens, self.threshold, self.renormalize, self.include_self,
                    self.filter_after)


@triggers.register("always")
@dataclass(frozen=True)
class AlwaysTrigger:
    """Retrieve before every drafted sentence (FS-RAG-like); the flagged position is the draft's start."""

    def should_retrieve(self, entropy, attention, tokens) -> TriggerDecision:
        return TriggerDecision(True, 0)


@triggers.register("never")
@dataclass(frozen=True)
class NeverTrigger:
    """Never retrieve (the w/o RAG baseline)."""

    def should_retrieve(self, entropy, attention, tokens) -> TriggerDecision:
        return TriggerDecision(False, None)


def rind(entropy: np.ndarray, attention: np.ndarray, tokens: Sequence[str], threshold: float = DEFAULT_THRESHOLD,
         renormalize: bool = True, include_self: bool = False, filter_after: bool = False) -> TriggerDecision:
    """RIND decision for one draft: flag the first token whose score exceeds `threshold`.

    With `filter_after`, any raw score H·a above θ triggers retrieval (as in DRAGIN's code); the
    position is then the first flagged content token, or the first flagged token when all are stop words.
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    n = len(tokens)
    if entropy.shape != (n,) or np.shape(attention)[-2:] != (n, n) or np.ndim(attention) not in (2, 3):
        raise ValueError(f"RIND needs entropy [T] and attention [heads, T, T] or [T, T] for T={n} tokens, got "
                         f"{entropy.shape} and {np.shape(attention)}")
    a = max_later_attention(attention, include_self)
    if renormalize:
        a = renormalize_per_sentence(a, sentence_ranges(tokens))
    content = content_mask(tokens)
    raw = entropy * a
    scores = raw if filter_after else raw * content
    above = scores > threshold
    if not above.any():
        return TriggerDecision(False, None, scores)
    flagged = above & content
    first = int(np.argmax(flagged)) if flagged.any() else int(np.argmax(above))
    return TriggerDecision(True, first, scores)


def max_later_attention(attention: np.ndarray, include_self: bool = False) -> np.ndarray:
    """a_max [T]: per head, the largest attention any later token j > i (j ≥ i) pays to token i (0 if
    none), then the mean over heads (DRAGIN). attention: [heads, T, T], or [T, T] for a single head."""
    att = np.asarray(attention, dtype=np.float64)
    att = att[None] if att.ndim == 2 else att
    n = att.shape[-1]
    if not n:
        return np.zeros(0)
    later = np.tril(np.ones((n, n), dtype=bool), k=0 if include_self else -1)  # row j, column i ≤ / < j
    return np.where(later, att, 0.0).max(axis=1).mean(axis=0)


def renormalize_per_sentence(a: np.ndarray, sentences: list[TokenSpan]) -> np.ndarray:
    """DRAGIN code: a_i / Σ_{k in sentence} a_k × |sentence| (mean 1 inside each sentence; 0 if the sum is 0)."""
    out = np.zeros_like(a, dtype=np.float64)
    for s, e in sentences:
        total = a[s:e].sum()
        if total > 0:
            out[s:e] = a[s:e] / total * (e - s)
    return out


def content_mask(tokens: Sequence[str]) -> np.ndarray:
    """bool [T]: the token overlaps at least one word that is not an English stop word (s_i = 1)."""
    text, starts = _concat(tokens)
    out = np.zeros(len(tokens), dtype=bool)
    for m in _WORD.finditer(text):
        if m.group().lower() in ENGLISH_STOP_WORDS:
            continue
        out[_token_at(starts, m.start()): _token_at(starts, m.end() - 1) + 1] = True
    return out


def token_words(tokens: Sequence[str]) -> list[tuple[str, int, int]]:
    """The words of the decoded tokens as (word, first token, end token) with token ranges [start, end)."""
    text, starts = _concat(tokens)
    return [(m.group(), _token_at(starts, m.start()), _token_at(starts, m.end() - 1) + 1)
            for m in _WORD.finditer(text)]


def sentence_ranges(tokens: Sequence[str]) -> list[TokenSpan]:
    """Split decoded tokens into sentences: contiguous token ranges covering all tokens.

    A sentence ends with the token holding a run of . ! ? (plus closing quotes/brackets) followed by
    whitespace or the end, or holding a newline. Not after initials ("J.", "U.S.") or common
    abbreviations (Mr., Dr., St., ...). Whitespace-only stretches join the sentence before them.
    """
    text, starts = _concat(tokens)
    ends: list[int] = []
    for m in _SENT_END.finditer(text):
        if m.group().startswith(".") and _is_abbreviation(text[: m.start()]):
            continue
        k = _token_at(starts, m.end() - 1) + 1
        if not ends or k > ends[-1]:
            ends.append(k)
    out: list[TokenSpan] = []
    for s, e in zip([0] + ends, ends + [len(tokens)]):
        if e <= s:
            continue
        if out and not "".join(tokens[s:e]).strip():  # whitespace only: belongs to the sentence before
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _concat(tokens: Sequence[str]) -> tuple[str, np.ndarray]:
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    return "".join(tokens), np.concatenate([[0], np.cumsum(lengths)])[:-1]


def _token_at(starts: np.ndarray, char: int) -> int:
    """Index of the token whose characters include `char` (empty tokens are skipped)."""
    return int(np.searchsorted(starts, char, side="right") - 1)


def _is_abbreviation(before: str) -> bool:
    m = re.search(r"(\w+)$", before)
    if not m:
        return False
    word = m.group(1)
    return (len(word) == 1 and word.isupper()) or word.lower() in _ABBREV
