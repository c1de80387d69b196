"""Head selectors: which heads to ablate at one decoding step (ablation and Dynamic RAG share them).

A selector factory is registered with `@selector("name")` and returns `select(ctx) -> bool [L, H]`,
where `ctx` is the step's clean (unmasked) pass plus its dynamic set (Eq. 1 on that pass and the
sample's needle span). Counts: `n=None` masks as many heads as the step's own dynamic set
(`--match step`); an integer masks exactly that many at every step. The ablation experiment
defaults to `--match average`: n = the mean number of heads the dynamic condition masked per step
over the whole run, rounded half up and at least 1 (experiments/ablation.py, `matched_heads`).

`progressive` ranks heads by a rule the paper leaves open (Sec. 3.3.2): the step's dynamic heads
first, then the remaining heads by the attention they put on needle positions holding the token
being generated (the copy source), then by their total attention mass on the needle, then by flat
index; within the dynamic set the same keys decide which heads come first.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from dynheads.errors import ConfigError
from dynheads.registry import Registry
from dynheads.scores.copy_paste import copy_paste_active

if TYPE_CHECKING:  # annotations only: `dynheads list selectors` needs no torch
    from dynheads.tracing.tracer import Intervention, StepView


@dataclass(frozen=True)
class StepContext:
    """What a selector sees at one step."""

    view: StepView  # the clean pass of the step
    dynamic: np.ndarray  # bool [L, H]: the step's dynamic retrieval heads (Eq. 1 on the clean pass)
    needle_tokens: np.ndarray  # int [n]: token ids at the needle positions, in rows_<span> order


Selector = Callable[[StepContext], np.ndarray]
selectors: Registry[Callable[..., Selector]] = Registry("head selector")
selector = selectors.register


@selector("dynamic")
def dynamic_selector() -> Selector:
    """The step's own dynamic set D_t (Sec. 3.3.1)."""
    return lambda ctx: ctx.dynamic.copy()


@selector("static")
def static_selector(ranking: np.ndarray, n: int | None = None) -> Selector:
    """Top-n heads of a static ranking [L, H] from a separate detection run (Sec. 3.3.1 baseline (a))."""
    order = _descending(np.asarray(ranking, float))
    return lambda ctx: _first(order, _count(n, ctx), ctx.dynamic.shape)


@selector("static_excluding_dynamic")
def static_excluding_dynamic_selector(ranking: np.ndarray, n: int | None = None) -> Selector:
    """Top-n of the static ranking after skipping the step's own D_t (the control the paper lacks)."""
    order = _descending(np.asarray(ranking, float))

    def select(ctx: StepContext) -> np.ndarray:
        rest = order[~ctx.dynamic.reshape(-1)[order]]
        return _first(rest, _count(n, ctx), ctx.dynamic.shape)

    return select


@selector("random")
def random_selector(rng: np.random.Generator, n: int | None = None, per_step: bool = False) -> Selector:
    """n uniformly random heads (Sec. 3.3.1 baseline (b)).

    per_step=False (default, as Wu et al.'s random heads are fixed per cell): one permutation per
    sample, each step masks its first n heads; per_step=True draws a fresh set every step.
    """
    drawn: list[np.ndarray] = []

    def select(ctx: StepContext) -> np.ndarray:
        if per_step or not drawn:
            drawn[:] = [rng.permutation(ctx.dynamic.size)]
        return _first(drawn[0], _count(n, ctx), ctx.dynamic.shape)

    return select


@selector("progressive")
def progressive_selector(k: int, span: str = "needle") -> Selector:
    """k heads per step in `progressive_order` (Sec. 3.3.2; the ranking rule is ours, see module doc)."""
    return lambda ctx: _first(progressive_order(ctx, span), k, ctx.dynamic.shape)


def progressive_order(ctx: StepContext, span: str = "needle") -> np.ndarray:
    """Flat head indices: dynamic first, then copy-token attention, needle mass, flat index."""
    rows_key, mass_key = f"rows_{span}", f"mass_{span}"
    if rows_key not in ctx.view.arrays or mass_key not in ctx.view.arrays:
        raise ConfigError(f"the progressive selector needs {rows_key} and {mass_key} (trace with row_spans=('{span}',))")
    rows = ctx.view.arrays[rows_key]  # [L, H, n]
    copy_attention = rows[..., ctx.needle_tokens == ctx.view.token_id].sum(-1).reshape(-1)
    mass = ctx.view.arrays[mass_key].reshape(-1)
    flat = np.arange(mass.size)
    return np.lexsort((flat, -mass, -copy_attention, ~ctx.dynamic.reshape(-1)))


def dynamic_set(view: StepView, token_spans: dict, span: str = "needle") -> np.ndarray:
    """bool [L, H]: Eq. 1 on one step's clean pass (top-1 in the needle and equal to its token)."""
    arrays = {"top1_pos": view.arrays["top1_pos"][None], "top1_token": view.arrays["top1_token"][None],
              "token_id": np.array([view.token_id])}
    return copy_paste_active(arrays, token_spans, span=span)[0]


def make_intervention(select: Selector, token_spans: dict, input_ids, span: str = "needle") -> Intervention:
    """Wrap a selector as a tracer intervention for one sample (its needle spans and prompt ids)."""
    ids = np.asarray(input_ids)
    needle_tokens = ids[[p for s, e in token_spans[span] for p in range(s, e)]]

    def intervention(view: StepView) -> np.ndarray:
        return np.asarray(select(StepContext(view, dynamic_set(view, token_spans, span), needle_tokens)), bool)

    return intervention


def build(name: str, **available: Any) -> Selector:
    """Create a registered selector, passing only the arguments its factory declares."""
    factory = selectors.get(name)
    params = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in available.items() if k in params})


# --- internals -----------------------------------------------------------------------------
def _descending(score: np.ndarray) -> np.ndarray:
    """Flat indices by score, highest first; ties by flat index (as dynamism.top_heads)."""
    flat = score.reshape(-1)
    return np.lexsort((np.arange(flat.size), -flat))


def _count(n: int | None, ctx: StepContext) -> int:
    return int(ctx.dynamic.sum()) if n is None else int(n)


def _first(order: np.ndarray, n: int, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(int(np.prod(shape)), bool)
    mask[order[:max(n, 0)]] = True
    return mask.reshape(shape)
