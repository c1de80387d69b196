"""Head sets that decide inside the step (IN_LAYER): each layer's open KV heads from what that layer sees.

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

from dynheads.headsets.base import IN_LAYER, HeadSet, Step, head_set

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
