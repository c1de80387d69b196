"""Head sets that decide inside the step (IN_LAYER): each layer's open KV heads from what that layer sees.

`layerwise` (issue 19): the layers up to an early layer l keep the static set's heads there; above l, a linear
probe on the residual stream after layer l *of the same step* (as layer l + 1's attention receives it) scores
every head above l, and the top of those fill the rest of the budget, so exactly k units open per step. The
probe is fitted on the detection run only (runners/sparse.py `fit_layer_probe`); its cost is its weights,
read once per step (`probe_read`).

`query` (issue 19): before a closed head attends, Quest's page bounds (tracing/page_bounds.py) bound its
logits over the far keys (outside its S sinks and W recent keys) from the step's own query; the head is
opened when that bound beats the log-mass of the near keys it reads anyway by more than a threshold
(`pull > threshold`). The threshold is the budget: `sparse` calibrates it on the detection run so that
k units open per step on average (how many open at one step varies), see runners/sparse.py.

The decision is paid for: every KV head reads its far pages' min and max (2 vectors per page of P keys
instead of P keys and P values); `decision_read` gives that as a fraction of the cache.
"""
from __future__ import annotations

import numpy as np

from dynheads.errors import ConfigError
from dynheads.headsets.base import IN_LAYER, HeadSet, Step, head_set, top_k

DEFAULT_PAGE = 16  # Quest's page size (tracing/page_bounds.DEFAULT_PAGE; imported lazily: listing needs no torch)


@head_set("query")
def query_bounds(threshold: float | None = None, page: int = DEFAULT_PAGE) -> HeadSet:
    """Units whose far-page bound on the current query beats their near keys by `threshold` (calibrated on the
    detection run to open k units per step on average; Quest's page bound, used here to choose heads)."""
    from dynheads.tracing.page_bounds import PageSummaries

    summaries = PageSummaries(page)  # one generation: kept as its cache grows

    def choose(step: Step) -> np.ndarray:
        seen = step.need("layer_input", "the layer's query and keys")
        pull = layer_pull(seen, step.layer, summaries)
        cut = float("inf") if threshold is None else threshold
        return step.units(pull[None])[0] > cut

    return HeadSet("query", choose, IN_LAYER)


def layer_pull(seen, layer: int, summaries) -> np.ndarray:
    """float [query heads]: each head's far pull at this layer (tracing/page_bounds.far_pull; -inf: no far key)."""
    from dynheads.tracing.page_bounds import far_pull

    sparsity = seen.sparsity
    pages = summaries.update(layer, seen.key)
    return far_pull(seen.query, seen.key, pages, sparsity.sink, sparsity.recent, seen.scale,
                    seen.visible_from)[0].numpy()


def decision_read(n_keys: int, page: int, sink: int, recent: int) -> float:
    """Fraction of the cache read to decide one step: each KV head's far pages, 2 vectors per page against
    2 per key for the whole cache (the near keys are read anyway, so they cost nothing extra)."""
    from dynheads.tracing.page_bounds import far_pages

    pages = far_pages(n_keys, page, sink, recent)
    return (pages.stop - pages.start) / n_keys if n_keys else 0.0


@head_set("layerwise")
def layerwise(layer_probe=None, ranking: np.ndarray | None = None) -> HeadSet:
    """Static top-k units in layers <= l; above l, the top units of a probe on the step's residual after layer l
    (layer_probe: an analyses.probes.Probe whose meta["layer"] is l and whose shape covers layers l+1..L-1)."""
    if layer_probe is None or ranking is None:
        raise ConfigError("head set 'layerwise' needs a layer probe and a static ranking (sparse --detection fits "
                          "both on the detection run)")
    below = int(layer_probe.meta["layer"])  # the probe reads the residual after this layer
    chosen: dict[int, np.ndarray] = {}  # step t -> bool [layers, units], filled at layer below + 1

    def choose(step: Step) -> np.ndarray:
        static = top_k(step.units(np.asarray(ranking, float)), step.count())
        if step.layer <= below:
            return static[step.layer]
        if step.t not in chosen:
            residual = step.need("layer_input", "the residual stream").residual
            if residual is None:
                raise ConfigError("head set 'layerwise': this model's attention receives no hidden state to probe")
            scores = step.units(layer_probe.predict(residual[0].float().cpu().numpy()))  # [layers above, units]
            mask = static.copy()
            mask[below + 1:] = top_k(scores, max(step.count() - int(static[:below + 1].sum()), 0))
            chosen.clear()
            chosen[step.t] = mask
        return chosen[step.t][step.layer]

    return HeadSet("layerwise", choose, IN_LAYER)


def probe_read(layer_probe, cache_size: int) -> float:
    """Fraction of the cache that reading the probe's weights once costs (parameters / cached key and value
    elements): the decision's price, as page summaries are the `query` policy's."""
    params = sum(p.numel() for p in layer_probe.model.parameters())
    return params / cache_size if cache_size else 0.0
