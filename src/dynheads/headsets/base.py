"""Which heads: one head-set abstraction and one registry, used by ablation, Dynamic RAG and sparse decoding.

A head set answers one question at one decoding step: which heads? Ablation masks them, Dynamic RAG reads
their attention to choose the context it opens, head-sparse decoding lets them read the whole KV cache.
A factory registered with `@head_set("name")` takes the run-level inputs it declares (a static ranking, a
probe, `per_step`, …; `build` passes only those) and returns a `HeadSet`: a chooser `(Step) -> bool
[layers, units]`, when it decides, and its budget. It is built once per generation (one sample under one
condition), so a chooser may keep state across steps (the random set drawn once per sample).

`Step` is what is known when the heads of step t are chosen: the step index, the layout, the budget and
its unit, a random generator (seeded by the consumer), the previous kept step (its token and final hidden
state), the sample (prompt ids and named token spans) and its span, and — for sets that decide after the
step's own dense pass — that pass with the run's head score on it (`scores`, and D_t as `active`).
When the consumers call a chooser (`decides`):

  BEFORE_STEP      from t, the previous step and the RNG only (static, random, predicted, all, none)
  AFTER_FULL_PASS  also from step t's own dense pass (dynamic, oracle, progressive, static_excluding_dynamic):
                   ablation always has it (the clean pass; the masked pass is recomputed), Dynamic RAG has the
                   identification step, head-sparse decoding runs the step dense first and recomputes it sparse
  IN_LAYER         per layer inside the forward pass, from what that layer sees (`Step.layer`,
                   `Step.layer_input`: a tracing.sparse.LayerInput with its query and keys): head-sparse
                   decoding calls them inside each step (in_step.py: `query`); ablation and RAG refuse them
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.registry import Registry, Spec

if TYPE_CHECKING:  # annotations only: `dynheads list heads` needs no torch
    from dynheads.tasks.base import EncodedSample
    from dynheads.tracing.tracer import StepView

BEFORE_STEP, AFTER_FULL_PASS, IN_LAYER = "before_step", "after_full_pass", "in_layer"
UNITS = ("query", "kv")


@dataclass(frozen=True)
class Budget:
    """How many units a head set picks per step, and what a unit is."""

    k: int | None = None  # units per step over all layers; None: as many as the step's own D_t (ablation --match step)
    unit: str = "query"  # query: one query head; kv: one KV head (a GQA group, chosen when any of its query heads is)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ConfigError(f"unknown head unit '{self.unit}'; choose one of: {', '.join(UNITS)}")


@dataclass(frozen=True)
class Step:
    """What is known when the heads of decoding step t are chosen (per-head arrays are [layers, query heads])."""

    t: int  # 0 = the step that emits the first answer token
    layout: HeadLayout  # layers, query heads, KV heads (from the model config)
    budget: Budget
    rng: np.random.Generator | None = None  # this step's generator; each consumer documents how it is seeded
    previous: StepView | None = None  # the last kept step (token, final hidden state); None at t = 0
    current: StepView | None = None  # step t's own dense pass, when the consumer ran it (AFTER_FULL_PASS)
    scores: np.ndarray | None = None  # float [L, H]: the run's head score on `current`
    active: np.ndarray | None = None  # bool [L, H]: D_t, heads whose score exceeds the score's threshold
    sample: EncodedSample | None = None  # the prompt: token ids and named token spans
    span: str = "needle"  # the task's span (the needle, the supporting facts)
    layer: int | None = None  # IN_LAYER sets: the layer being decided (None: every layer at once)
    layer_input: Any = None  # IN_LAYER sets: what that layer sees (its query states, the residual stream)

    @property
    def group(self) -> int:
        """Query heads per unit: 1 for query heads, the GQA group size for KV heads."""
        return self.layout.group_size if self.budget.unit == "kv" else 1

    @property
    def shape(self) -> tuple[int, int]:
        """[layers, units] of the mask a chooser returns."""
        return self.layout.n_layers, self.layout.n_heads // self.group

    def units(self, per_head: np.ndarray) -> np.ndarray:
        """Per-query-head values [L, H] → per-unit values [L, units] (max over each group), float."""
        values = np.asarray(per_head, float)
        return values.reshape(values.shape[0], -1, self.group).max(-1)

    def count(self) -> int:
        """Units to pick: the budget's k, or the number of D_t's units when k is None."""
        if self.budget.k is not None:
            return int(self.budget.k)
        return int((self.units(self.need("active", "k = |D_t|")) > 0).sum())

    def need(self, name: str, why: str = "") -> Any:
        """A field the chooser cannot do without; a one-line ConfigError when the consumer did not give it."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"this head set needs the step's {name}{f' ({why})' if why else ''}, which "
                              "this command does not provide (see `dynheads list heads`)")
        return value


Chooser = Callable[[Step], np.ndarray]  # bool [layers, units]


@dataclass(frozen=True)
class HeadSet:
    """A built head set: its chooser, when it decides, its budget; `constant` marks every head / no head."""

    name: str
    choose: Chooser
    decides: str = BEFORE_STEP
    budget: Budget = Budget()
    constant: bool | None = None  # True: every head at every step; False: no head ever; None: depends on the step

    def at(self, t: int, layout: HeadLayout, **known: Any) -> np.ndarray:
        """bool [layers, units]: the units chosen at step t; `known` fills the other `Step` fields."""
        return np.asarray(self.choose(Step(t, layout, self.budget, **known)), bool)


head_sets: Registry[Callable[..., HeadSet]] = Registry("head set")
head_set = head_sets.register


def build(spec: Spec | str, k: int | None = None, unit: str = "query", **available: Any) -> HeadSet:
    """Create a registered head set with budget (k, unit): the spec's own arguments, then those of
    `available` its factory declares (so one call site serves every head set)."""
    import dynheads.headsets.builtin  # noqa: F401  (built-ins register at import)
    import dynheads.headsets.in_step  # noqa: F401

    spec = Spec(spec) if isinstance(spec, str) else spec
    factory = head_sets.get(spec.name)
    params = inspect.signature(factory).parameters
    unknown = [a for a in spec.args if a not in params]
    if unknown:
        raise ConfigError(f"head set '{spec.name}' has no argument '{unknown[0]}'")
    args = {**{a: v for a, v in available.items() if a in params}, **spec.args}
    return replace(factory(**args), budget=Budget(k, unit))


def descending(values: np.ndarray) -> np.ndarray:
    """Flat indices by value, highest first; ties by flat index (as dynamism.top_heads)."""
    flat = np.asarray(values, float).reshape(-1)
    return np.lexsort((np.arange(flat.size), -flat))


def first(order: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """bool mask of `shape` with the first k flat indices of `order` set."""
    mask = np.zeros(int(np.prod(shape)), bool)
    mask[order[:max(k, 0)]] = True
    return mask.reshape(shape)


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """bool mask of the k highest values (ties by flat index), same shape as `values`."""
    return first(descending(values), k, np.shape(values))
