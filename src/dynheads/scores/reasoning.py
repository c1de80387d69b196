"""Eq. 2 reasoning retrieval score: a head's attention mass on the supporting facts over its context mass.

S_reasoning(x_t, h) = Σ_{i ∈ support} a_i / Σ_{j ∉ sinks ∪ local window} a_j   (paper Sec. 4, Eq. 2,
adapted there from HeadKV and QRHead). The tracer records the numerator as `mass_support` and the
denominator as `context_mass` (records.py); this module only divides them.

The paper states neither the sink size, nor the local window, nor the threshold that makes a head a
"reasoning retrieval head". The defaults below are a third-party reimplementation's choices (WakeKV
notes: first 4 positions, last 32 positions, threshold 0.1), not the paper's; they are reported in the
README's choices table.
"""
from __future__ import annotations

import numpy as np

from dynheads.scores.base import head_score

# --- defaults where the paper is silent (third-party choices, see module docstring) ---------------
SINK_POSITIONS = 4  # attention-sink positions excluded from the denominator: the first 4 of the sequence
LOCAL_WINDOW = 32  # local window excluded from the denominator: the last 32 positions (query included)
ACTIVE_THRESHOLD = 0.1  # a head is an active reasoning retrieval head at a step when its score exceeds this


def reasoning_score(mass_support: np.ndarray, context_mass: np.ndarray) -> np.ndarray:
    """Eq. 2 from recorded masses, float32 of the same shape ([steps, layers, heads] or [layers, heads]).

    Where the denominator is 0 (all mass on sinks and the local window) the score is 0. The ratio is not
    clipped: it exceeds 1 only if support tokens fall inside the sinks or the local window, which the
    prompt layout (context before the question) avoids.
    """
    num = np.asarray(mass_support, dtype=np.float32)
    den = np.asarray(context_mass, dtype=np.float32)
    if num.shape != den.shape:
        raise ValueError(f"mass_support {num.shape} and context_mass {den.shape} differ in shape")
    out = np.zeros(num.shape, dtype=np.float32)
    np.divide(num, den, out=out, where=den > 0)
    return out


@head_score("reasoning", needs=("mass_support", "context_mass"), mass_spans=("support",),
            threshold=ACTIVE_THRESHOLD)
def reasoning_head_score(arrays: dict[str, np.ndarray], token_spans: dict, span: str = "support") -> np.ndarray:
    """Eq. 2 per step and head from a sample's record arrays: mass_<span> / context_mass, float32 [T, L, H].

    The registered multi-hop head score (run config `score.name = "reasoning"`); a head is active at a
    step when its score exceeds the threshold (`HeadScore.active` and `active_heads`: strict >).
    """
    return reasoning_score(arrays[f"mass_{span}"], arrays["context_mass"])


def active_heads(score: np.ndarray, threshold: float = ACTIVE_THRESHOLD) -> np.ndarray:
    """Boolean mask of the step's reasoning retrieval heads: score > threshold (same shape as `score`)."""
    return np.asarray(score) > threshold


def denominator_mask(n_keys: int, sink: int = SINK_POSITIONS, local: int = LOCAL_WINDOW) -> np.ndarray:
    """bool [n_keys]: the key positions Eq. 2's denominator sums over for the newest query.

    Positions 0..sink-1 and the last `local` positions (the query's own included) are excluded; the
    reference the tracer's `context_mass` reduction is tested against.
    """
    mask = np.ones(n_keys, dtype=bool)
    mask[: min(sink, n_keys)] = False
    if local > 0:
        mask[max(n_keys - local, 0):] = False
    return mask


def reasoning_score_from_rows(attn: np.ndarray, support: np.ndarray, sink: int = SINK_POSITIONS,
                              local: int = LOCAL_WINDOW) -> np.ndarray:
    """Eq. 2 straight from attention rows: attn [..., n_keys] (newest query), support bool [n_keys] → [...]."""
    attn = np.asarray(attn, dtype=np.float32)
    support = np.asarray(support, dtype=bool)
    num = attn[..., support].sum(-1)
    den = attn[..., denominator_mask(attn.shape[-1], sink, local)].sum(-1)
    return reasoning_score(num, den)
