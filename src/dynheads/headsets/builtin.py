"""The built-in head sets (`dynheads list heads`); each command's own names for them are in names.py.

Ties always break by flat index (layer-major), so every choice is deterministic given the step and the RNG.
Per-query-head values become unit values by the max over each GQA group (a KV head is needed if any of its
query heads is).
"""
from __future__ import annotations

import numpy as np

from dynheads.errors import ConfigError
from dynheads.headsets.base import AFTER_FULL_PASS, BEFORE_STEP, HeadSet, Step, descending, first, head_set, top_k

CONSTANT = ("all", "none")  # the head sets whose choice ignores the budget (every head, no head)


@head_set("all")
def every_head() -> HeadSet:
    """Every head at every step (sparse `full`: the stock attention; RAG `full`: the whole context visible)."""
    return HeadSet("all", lambda step: np.ones(step.shape, bool), constant=True)


@head_set("none")
def no_head() -> HeadSet:
    """No head (sparse `streaming`: sinks + recent window only; RAG `none`: never retrieves; ablate `none`)."""
    return HeadSet("none", lambda step: np.zeros(step.shape, bool), constant=False)


@head_set("static")
def static(ranking: np.ndarray | None = None) -> HeadSet:
    """The top k of a static ranking [layers, heads] from a separate detection run, the same at every step."""
    ranking = _given(ranking, "static", "a ranking (a static ranking [layers, heads] from a detection run)")
    return HeadSet("static", lambda step: first(descending(step.units(ranking)), step.count(), step.shape))


@head_set("random")
def random(per_step: bool = False) -> HeadSet:
    """k uniformly random heads: one draw per generation (per_step=False, as Wu et al.'s per-cell heads) or a
    fresh draw at every step, from the step's generator."""
    drawn: list[np.ndarray] = []

    def choose(step: Step) -> np.ndarray:
        if per_step or not drawn:
            drawn[:] = [step.need("rng").permutation(int(np.prod(step.shape)))]
        return first(drawn[0], step.count(), step.shape)

    return HeadSet("random", choose)


@head_set("dynamic")
def dynamic() -> HeadSet:
    """The step's own dynamic set D_t (its head score on the step's dense pass above the threshold); its size
    is |D_t|, whatever the budget (Sec. 3.3.1; ablate `dynamic`)."""
    return HeadSet("dynamic", lambda step: step.units(step.need("active")) > 0, AFTER_FULL_PASS)


@head_set("static_excluding_dynamic")
def static_excluding_dynamic(ranking: np.ndarray | None = None) -> HeadSet:
    """The top k of a static ranking after skipping the step's own D_t (the control the paper lacks)."""
    ranking = _given(ranking, "static_excluding_dynamic", "a ranking")

    def choose(step: Step) -> np.ndarray:
        order = descending(step.units(ranking))
        rest = order[~(step.units(step.need("active")) > 0).reshape(-1)[order]]
        return first(rest, step.count(), step.shape)

    return HeadSet("static_excluding_dynamic", choose, AFTER_FULL_PASS)


@head_set("oracle")
def oracle() -> HeadSet:
    """The step's own D_t filled or cut to k: D_t first, then the step's head score, then attention mass on the
    task's span (an upper bound for any set that decides before the step; sparse `oracle`)."""

    def choose(step: Step) -> np.ndarray:
        score, active = step.need("scores"), step.need("active")
        mass = step.need("current").arrays.get(f"mass_{step.span}", np.zeros_like(score))
        keys = [step.units(x).reshape(-1) for x in (active.astype(float), score, mass)]
        order = np.lexsort((np.arange(keys[0].size), -keys[2], -keys[1], -keys[0]))
        return first(order, step.count(), step.shape)

    return HeadSet("oracle", choose, AFTER_FULL_PASS)


@head_set("progressive")
def progressive() -> HeadSet:
    """k heads in `progressive_order`: D_t first, then attention on span tokens equal to the generated one,
    then attention mass on the span (Sec. 3.3.2; the ranking rule is ours)."""
    return HeadSet("progressive", lambda step: first(progressive_order(step), step.count(), step.shape),
                   AFTER_FULL_PASS)


@head_set("predicted")
def predicted(predictor=None, ranking: np.ndarray | None = None, source: str = "previous") -> HeadSet:
    """The top k of a probe's per-head prediction from a final hidden state: the previous step's (decided before
    the step; at step 0 the static top k; sparse `predicted`) or the step's own (RAG `dynamic`: the regressor
    on the identification step)."""
    if source not in ("previous", "current"):
        raise ConfigError(f"head set 'predicted': source must be 'previous' or 'current', not '{source}'")
    if predictor is None:
        raise ConfigError("head set 'predicted' needs a predictor (a probe fitted on a detection run: "
                          "sparse --detection, rag --regressor)")

    def choose(step: Step) -> np.ndarray:
        view = step.previous if source == "previous" else step.current
        if view is not None and view.hidden is not None:
            return top_k(step.units(predictor.predict(view.hidden)), step.count())
        if source == "current":
            raise ConfigError("head set 'predicted' needs the step's hidden state (record_hidden)")
        return top_k(step.units(_given(ranking, "predicted", "a ranking for step 0")), step.count())

    return HeadSet("predicted", choose, BEFORE_STEP if source == "previous" else AFTER_FULL_PASS)


def progressive_order(step: Step) -> np.ndarray:
    """Flat unit indices: D_t first, then copy-token attention on the span, span mass, flat index."""
    view, span = step.need("current"), step.span
    rows_key, mass_key = f"rows_{span}", f"mass_{span}"
    if rows_key not in view.arrays or mass_key not in view.arrays:
        raise ConfigError(f"the progressive head set needs {rows_key} and {mass_key} (trace with row_spans=('{span}',))")
    ids = np.asarray(step.need("sample").input_ids)
    span_tokens = ids[[p for s, e in step.sample.token_spans[span] for p in range(s, e)]]  # rows_<span> order
    copy_attention = step.units(view.arrays[rows_key][..., span_tokens == view.token_id].sum(-1)).reshape(-1)
    mass = step.units(view.arrays[mass_key]).reshape(-1)
    dynamic = (step.units(step.need("active")) > 0).reshape(-1)
    return np.lexsort((np.arange(mass.size), -mass, -copy_attention, ~dynamic))


def _given(ranking, name: str, what: str) -> np.ndarray:
    if ranking is None:
        raise ConfigError(f"head set '{name}' needs {what}")
    return np.asarray(ranking, float)
