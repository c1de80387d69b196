"""Head retrieval scores: pure functions of what the tracer recorded.

A score takes the stacked record arrays of one sample (`[T, layers, heads]` each, plus
`token_id` [T]) and the sample's token spans, and returns float32 `[T, layers, heads]`. It names
the record arrays it needs, so the tracer is configured to compute only those, and the threshold
a head's score must *exceed* (strictly, the paper's word) to count as active (in the step's dynamic
set). Every consumer (dynamism, ablation, probes, static rankings) uses `HeadScore.active`, so the
comparison and the threshold are defined once, here and in the score's registration.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Callable

import numpy as np

from dynheads.registry import Registry

if TYPE_CHECKING:  # annotations only: `dynheads list scores` needs no torch
    from dynheads.tracing.tracer import StepView

ScoreFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class HeadScore:
    """A registered head score: the function, the record arrays it needs and its activity threshold."""

    name: str
    fn: ScoreFn
    needs: tuple[str, ...]
    mass_spans: tuple[str, ...]
    threshold: float

    def __call__(self, arrays: dict[str, np.ndarray], token_spans: dict, **args) -> np.ndarray:
        return self.fn(arrays, token_spans, **args)

    def active(self, scores: np.ndarray) -> np.ndarray:
        """Boolean dynamic sets: heads whose score exceeds the threshold (strict >)."""
        return np.asarray(scores) > self.threshold

    def with_args(self, **args) -> "HeadScore":
        """The same score with fixed arguments (e.g. the span a run scores: `span="support"`)."""
        return replace(self, fn=partial(self.fn, **args)) if args else self

    def on_step(self, view: StepView, token_spans: dict) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [L, H], active bool [L, H]) of one step's pass (a tracer StepView)."""
        arrays = {k: v[None] for k, v in view.arrays.items()} | {"token_id": np.array([view.token_id])}
        values = self(arrays, token_spans)[0]
        return values, self.active(values)


head_scores: Registry[HeadScore] = Registry("head score")


def head_score(name: str, needs: tuple[str, ...], threshold: float, mass_spans: tuple[str, ...] = ()):
    """Register `fn(arrays, token_spans, **args) -> float32 [T, L, H]`; active where score > threshold."""

    def deco(fn: ScoreFn) -> ScoreFn:
        head_scores.register(name)(HeadScore(name, fn, needs, mass_spans, threshold))
        return fn

    return deco


def get_score(name: str) -> HeadScore:
    import dynheads.scores.copy_paste  # noqa: F401  (built-ins register at import)
    try:
        import dynheads.scores.reasoning  # noqa: F401
    except ImportError:
        pass
    return head_scores.get(name)
