"""Which heads drive a Dynamic RAG retrieval (paper Sec. 5, Alg. 2 step 1): the compared strategies.

Every strategy selects `n` heads (paper: 5) at an identification step, from that step's record
(`StepView`: attention rows over the context and the final hidden state):

  dynamic         top-n heads by the Eq. 2 scores a regressor predicts from the step's hidden state
                  (paper: the HotpotQA MLP regressor of Sec. 4.2, trained on a separate run)
  static          top-n heads of a ranking from a separate detection run (same heads every time)
  dynamic-random  n fresh random heads at every retrieval
  fixed-random    n random heads drawn once per question
  none            never retrieves; the context stays hidden (paper: "w/o RAG")
  full            never retrieves; the whole context is visible (our upper bound, not in the paper)

Static and random selection reuse `interventions.selectors` (one implementation per strategy).
A strategy is created once per run; `start(rng)` gives the per-question picker, so a question's
random heads come from the RNG the experiment seeds with (seed, question id, strategy).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dynheads.errors import ConfigError
from dynheads.experiments.probes import Probe, ProbeConfig, fit_probe
from dynheads.interventions import selectors
from dynheads.registry import Registry
from dynheads.tracing.tracer import StepView

N_HEADS = 5  # paper Sec. 5: every configuration selects 5 heads

Picker = Callable[[StepView], np.ndarray]  # identification step → bool [L, H]


@dataclass(frozen=True)
class HeadStrategy:
    """A named strategy: whether it retrieves, whether the context starts visible, and its picker factory."""

    name: str
    retrieves: bool
    context_visible: bool
    make_picker: Callable[[np.random.Generator], Picker] | None = None

    def start(self, rng: np.random.Generator) -> Picker:
        """The picker for one question (random strategies draw from `rng`)."""
        if self.make_picker is None:
            raise ConfigError(f"strategy '{self.name}' does not select heads")
        return self.make_picker(rng)


strategies: Registry[Callable[..., HeadStrategy]] = Registry("head strategy")


@strategies.register("dynamic")
def dynamic_strategy(regressor: Probe | None, shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    if regressor is None:
        raise ConfigError("strategy 'dynamic' needs a regressor (--regressor: a saved .pt or a multihop run folder)")
    if tuple(regressor.shape) != tuple(shape):
        raise ConfigError(f"the regressor predicts {regressor.shape[0]}×{regressor.shape[1]} heads; "
                          f"the model has {shape[0]}×{shape[1]}")

    def make(rng: np.random.Generator) -> Picker:
        def pick(view: StepView) -> np.ndarray:
            if view.hidden is None:
                raise ConfigError("strategy 'dynamic' needs the identification step's hidden state")
            return top_n(regressor.predict(view.hidden), n_heads)
        return pick

    return HeadStrategy("dynamic", True, False, make)


@strategies.register("static")
def static_strategy(ranking: np.ndarray | None, shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    if ranking is None:
        raise ConfigError("strategy 'static' needs a ranking (--static-ranking: head_scores JSON or a multihop run folder)")
    if tuple(np.shape(ranking)) != tuple(shape):
        raise ConfigError(f"the static ranking has shape {np.shape(ranking)}; the model has {shape}")
    select = selectors.build("static", ranking=np.asarray(ranking, float), n=n_heads)
    return HeadStrategy("static", True, False, lambda rng: _via_selector(select, shape))


@strategies.register("dynamic-random")
def dynamic_random_strategy(shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    return HeadStrategy("dynamic-random", True, False, lambda rng: _via_selector(
        selectors.build("random", rng=rng, n=n_heads, per_step=True), shape))


@strategies.register("fixed-random")
def fixed_random_strategy(shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    return HeadStrategy("fixed-random", True, False, lambda rng: _via_selector(
        selectors.build("random", rng=rng, n=n_heads, per_step=False), shape))


@strategies.register("none")
def no_context_strategy() -> HeadStrategy:
    return HeadStrategy("none", False, False)


@strategies.register("full")
def full_context_strategy() -> HeadStrategy:
    return HeadStrategy("full", False, True)


def build_strategy(name: str, **available: Any) -> HeadStrategy:
    """Create a registered strategy, passing only the arguments its factory declares."""
    factory = strategies.get(name)
    params = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in available.items() if k in params})


def top_n(score: np.ndarray, n: int) -> np.ndarray:
    """bool mask of the n highest scores (ties by flat index), same shape as `score`."""
    flat = np.asarray(score, float).reshape(-1)
    mask = np.zeros(flat.size, bool)
    mask[np.lexsort((np.arange(flat.size), -flat))[:n]] = True
    return mask.reshape(np.shape(score))


# --- the regressor behind `dynamic` --------------------------------------------------------------

def fit_regressor(hidden: np.ndarray, scores: np.ndarray, sample_ids: np.ndarray, rng: np.random.Generator,
                  meta: dict[str, Any] | None = None, config: ProbeConfig | None = None,
                  steps: np.ndarray | None = None) -> Probe:
    """The Table 3 regressor the `dynamic` strategy applies: hidden [N, d] → Eq. 2 scores [N, L, H].

    `experiments.probes.fit_probe` with `ProbeConfig(regress=True)` (hidden layers (2d, d, d), dropout 0.1,
    Adam 3e-4, batch 128, gradient clip 1.0, MSE, early stopping) and a 90/10 train/validation split by
    question (the probe table's test part is not needed here).
    """
    cfg = config or ProbeConfig(regress=True, split=(0.9, 0.1, 0.0))
    return fit_probe(hidden, scores, sample_ids, steps, cfg, rng, meta=meta)


def _via_selector(select: selectors.Selector, shape: tuple[int, int]) -> Picker:
    """Adapt an ablation selector (which reads a StepContext) to an identification step."""
    empty = np.zeros(shape, bool)
    return lambda view: np.asarray(select(selectors.StepContext(view, empty, np.zeros(0, np.int64))), bool)
