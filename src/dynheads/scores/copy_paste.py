"""Eq. 1 copy-paste retrieval score (Wu et al. 2024, per step as in Lin et al. 2026)."""
from __future__ import annotations

import numpy as np

from dynheads.scores.base import head_score

# Eq. 1 is an indicator (0 or 1); a head is a dynamic retrieval head where it exceeds 0.5, i.e. is 1.
ACTIVE_THRESHOLD = 0.5


def in_spans(positions: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Boolean array: which positions lie in any of the half-open token ranges."""
    hit = np.zeros(positions.shape, dtype=bool)
    for s, e in spans:
        hit |= (positions >= s) & (positions < e)
    return hit


@head_score("copy_paste", needs=("top1_pos", "top1_token"), threshold=ACTIVE_THRESHOLD)
def copy_paste_score(arrays: dict[str, np.ndarray], token_spans: dict, span: str = "needle",
                     pos_key: str = "top1_pos", token_key: str = "top1_token",
                     generated_key: str = "token_id") -> np.ndarray:
    """1 where a head's top-1 position lies in the needle and holds the generated token, else 0.

    Eq. 1 of Lin et al.; unlike Wu et al. it is not divided by the needle length (that sample-level
    score is `wu_sample_scores` in analyses/dynamism.py). Shape [T, layers, heads], float32.
    """
    pos, tok = arrays[pos_key], arrays[token_key]
    generated = arrays[generated_key][:, None, None]
    return (in_spans(pos, token_spans[span]) & (tok == generated)).astype(np.float32)


def copy_paste_active(arrays: dict[str, np.ndarray], token_spans: dict, **args) -> np.ndarray:
    """bool [T, layers, heads]: the dynamic sets D_t, Eq. 1 > ACTIVE_THRESHOLD (`copy_paste_score` args)."""
    return copy_paste_score(arrays, token_spans, **args) > ACTIVE_THRESHOLD
