"""Head sets as the tracer's two callbacks: an ablation intervention and a head-sparse decoding policy.

- `intervention` (ablation): the tracer runs each step clean and passes that pass; the chooser sees it as
  `current` with the run's head score on it (D_t), and the step is recomputed with the chosen heads
  masked. `previous` is not given (the intervention never sees the masked pass that is kept).
- `decoding_policy` (head-sparse decoding): called before each step with the previous kept step; for an
  AFTER_FULL_PASS set the tracer first runs the step dense (`needs_full_pass`), and the step is recomputed
  sparse with the chosen units open; an IN_LAYER set returns a per-layer decision that the attention
  function calls inside the step with that layer's query and keys.
Dynamic RAG calls `HeadSet.at` itself, at its identification step (rag/loop.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.headsets.base import AFTER_FULL_PASS, IN_LAYER, HeadSet

if TYPE_CHECKING:
    from dynheads.scores.base import HeadScore
    from dynheads.tasks.base import EncodedSample
    from dynheads.tracing.tracer import HeadPolicy, Intervention


def intervention(heads: HeadSet, sample: EncodedSample, layout: HeadLayout, score: HeadScore, span: str = "needle",
                 rng: np.random.Generator | None = None) -> Intervention:
    """The tracer intervention masking the head set's query heads at every step of one sample.

    `score` is the run's head score (with its span bound), computed on each clean pass for `active`;
    `rng` is the sample's generator, the same object at every step.
    """
    check_decides(heads, "ablation")
    if heads.budget.unit != "query":
        raise ConfigError(f"ablation masks query heads; head set '{heads.name}' counts {heads.budget.unit} heads")

    def mask(view) -> np.ndarray:
        scores, active = score.on_step(view, sample.token_spans)
        return heads.at(view.step, layout, rng=rng, current=view, scores=scores, active=active, sample=sample,
                        span=span)

    return mask


def decoding_policy(heads: HeadSet, sample: EncodedSample, layout: HeadLayout, score: HeadScore, span: str,
                    rng_at: Callable[[int], np.random.Generator]) -> HeadPolicy:
    """The tracer's head-sparse policy (t, previous kept step, step t's dense pass or None) → bool [L, units].

    `score` gives `scores`/`active` on the dense pass when there is one; `rng_at(t)` is step t's generator.
    """

    def policy(t: int, previous, full):
        scores, active = score.on_step(full, sample.token_spans) if full is not None else (None, None)
        known = dict(rng=rng_at(t), previous=previous, current=full, scores=scores, active=active, sample=sample,
                     span=span)
        if heads.decides == IN_LAYER:  # the tracer asks each layer inside the step (tracing/sparse.LayerDecision)
            return lambda layer, seen: heads.at(t, layout, layer=layer, layer_input=seen, **known)
        return heads.at(t, layout, **known)

    return policy


def needs_full_pass(heads: HeadSet) -> bool:
    """Whether the tracer must run the step dense before the head set decides (head-sparse decoding)."""
    return heads.decides == AFTER_FULL_PASS


def check_decides(heads: HeadSet, consumer: str) -> None:
    """Refuse a head set that decides inside the forward pass where the consumer cannot ask it per layer."""
    if heads.decides == IN_LAYER:
        raise ConfigError(f"head set '{heads.name}' decides per layer inside the forward pass, which {consumer} "
                          "does not support (head-sparse decoding does)")
