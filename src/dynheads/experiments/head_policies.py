"""Head policies for head-sparse decoding: which units read the whole cache at each decoding step.

A unit is a KV head (a GQA group; default) or a query head (`--unit query`). A policy factory is
registered with `@policy("name")`, gets the `PolicyInputs` of one sample and budget k (units opened
per step, over all layers) and returns the tracer's `HeadPolicy` (t, previous kept step, step t's
full pass) → bool [layers, units]. Query-head scores become unit scores by the max over the group
(a KV head is needed if any of its query heads is). Ties break by flat index, as everywhere.

- `full` opens everything, `streaming` nothing (both ignore k).
- `static`: the top k of a detection run's ranking (activation frequency of its head score).
- `random`: k units drawn afresh at every step, seeded from (seed, sample id, step).
- `oracle`: the step's own dynamic set D_t (the run's head score on the step's full pass), opened
  as it happens: the tracer runs step t in full, the policy sees it, the step is recomputed sparse.
  D_t's units come first, then the rest by the step's head score, then by attention mass on the
  task's span; the first k are opened (D_t truncated by the same keys when it has more than k units).
  An upper bound for any policy that decides before the step.
- `predicted`: a probe (experiments/probes.py) fitted on the detection run maps the final hidden
  state of step t − 1 to per-head probabilities of being active at step t; the top k are opened.
  Step 0 has no previous step: it opens the static top k (our choice).
"""
from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dynheads.errors import ConfigError
from dynheads.registry import Registry
from dynheads.tracing.tracer import HeadPolicy, StepView

# Step score on one full pass: (step view) -> (head score [L, H], active bool [L, H]).
StepScore = Callable[[StepView], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Policy:
    """A built policy: the tracer callback and whether it needs the step's full pass first."""

    select: HeadPolicy
    full_pass_first: bool = False


policies: Registry[Callable[..., Policy]] = Registry("head policy")
policy = policies.register
BUDGETLESS = ("full", "streaming")  # policies whose result does not depend on k


@policy("full")
def full_policy(shape: tuple[int, int]) -> Policy:
    """Every unit reads every key (the tracer then calls the stock attention unchanged)."""
    return Policy(lambda t, prev, full: np.ones(shape, bool))


@policy("streaming")
def streaming_policy(shape: tuple[int, int]) -> Policy:
    """No unit opened: every head reads only sinks + recent keys (DuoAttention's streaming heads)."""
    return Policy(lambda t, prev, full: np.zeros(shape, bool))


@policy("static")
def static_policy(k: int, ranking: np.ndarray, group: int) -> Policy:
    """The top k units of a static ranking [L, H], the same at every step."""
    mask = top_units(to_units(ranking, group), k)
    return Policy(lambda t, prev, full: mask.copy())


@policy("random")
def random_policy(k: int, shape: tuple[int, int], seed: int, sample_id: str) -> Policy:
    """k units drawn at every step from a generator seeded by (seed, sample id, step)."""
    key = zlib.crc32(sample_id.encode())

    def select(t: int, prev, full) -> np.ndarray:
        order = np.random.default_rng([seed, key, t]).permutation(int(np.prod(shape)))
        return first(order, k, shape)

    return Policy(select)


@policy("oracle")
def oracle_policy(k: int, group: int, step_score: StepScore, span: str) -> Policy:
    """The step's own dynamic set, seen on its full pass, filled or cut to k units (see module doc)."""

    def select(t: int, prev, full: StepView) -> np.ndarray:
        score, active = step_score(full)
        mass = full.arrays.get(f"mass_{span}", np.zeros_like(score))
        keys = [to_units(x, group).reshape(-1) for x in (active.astype(float), score, mass)]
        order = np.lexsort((np.arange(keys[0].size), -keys[2], -keys[1], -keys[0]))
        return first(order, k, (score.shape[0], score.shape[1] // group))

    return Policy(select, full_pass_first=True)


@policy("predicted")
def predicted_policy(k: int, ranking: np.ndarray, group: int, predictor) -> Policy:
    """Top k units of the probe's scores from step t − 1's final hidden state; the static set at step 0."""
    if predictor is None:
        raise ConfigError("the predicted policy needs a predictor fitted on the detection run")
    static = top_units(to_units(ranking, group), k)

    def select(t: int, prev: StepView | None, full) -> np.ndarray:
        if prev is None or prev.hidden is None:
            return static.copy()
        return top_units(to_units(predictor.predict(prev.hidden), group), k)

    return Policy(select)


def build_policy(name: str, **available: Any) -> Policy:
    """Create a registered policy, passing only the arguments its factory declares."""
    factory = policies.get(name)
    params = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in available.items() if k in params})


def to_units(score: np.ndarray, group: int) -> np.ndarray:
    """Per-query-head scores [L, H] → per-unit scores [L, H / group] (max over each group)."""
    score = np.asarray(score, float)
    return score.reshape(score.shape[0], -1, group).max(-1)


def top_units(score: np.ndarray, k: int) -> np.ndarray:
    """bool mask of the k highest-scoring units (ties by flat index)."""
    flat = score.reshape(-1)
    return first(np.lexsort((np.arange(flat.size), -flat)), k, score.shape)


def first(order: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(int(np.prod(shape)), bool)
    mask[order[:max(k, 0)]] = True
    return mask.reshape(shape)
