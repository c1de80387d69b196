"""Answer metrics: NIAH containment accuracy and ROUGE-L (rouge-score), plus SQuAD-style EM/F1."""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache


def contains_accuracy(response: str, answer: str) -> float:
    """1.0 when the full answer string (e.g. the UUID) appears in the response, else 0.0 (paper App. A.1)."""
    return float(answer.lower() in response.lower())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(response: str, reference: str) -> float:
    """ROUGE-L F-measure of the response against the reference (Google's rouge-score package)."""
    return float(_rouge().score(reference, response)["rougeL"].fmeasure)


# --- multi-hop QA: SQuAD-style EM / F1 as in HotpotQA's official hotpot_evaluate_v1.py ---------

_ANSWER_CUE = "the answer is"
_SPECIAL = ("yes", "no", "noanswer")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: str | list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(pred: str, golds: str | list[str]) -> float:
    """Token-overlap F1, max over gold answers; yes/no/noanswer must match exactly (HotpotQA guard)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    return max((_f1(pred, g) for g in golds), default=0.0)


def extract_answer(response: str) -> str:
    """The short answer inside a model response.

    If the response contains "the answer is" (any case), the text after its first occurrence on
    that line (DRAGIN's convention for chain-of-thought answers); otherwise the first non-empty line.
    Either is cut at its first sentence end (".", "!" or "?" after a lower-case letter or digit,
    then whitespace; so "U.S. Army" and "J. K. Rowling" stay whole). A leading "Answer:" and
    surrounding whitespace, quotes, asterisks and periods are removed.
    """
    at = response.lower().find(_ANSWER_CUE)
    if at >= 0:
        text = response[at + len(_ANSWER_CUE):].lstrip(" \t:").split("\n", 1)[0]
    else:
        lines = [ln for ln in response.splitlines() if ln.strip()]
        text = re.sub(r"^\s*answer\s*:\s*", "", lines[0] if lines else "", flags=re.IGNORECASE)
    text = re.split(r"(?<=[a-z0-9)\]][.!?])\s+", text.strip(), maxsplit=1)[0]
    return text.strip(" \t\"'*`.")


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in _SPECIAL or g in _SPECIAL) and p != g:
        return 0.0
    pt, gt = p.split(), g.split()
    common = sum((Counter(pt) & Counter(gt)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)
