"""Head sets that decide inside the step (IN_LAYER): each layer's open KV heads from what that layer sees.

`layerwise` (issue 19): the layers up to an early layer l keep the static set's heads there; above l, a linear
probe on the residual stream after layer l *of the same step* (as layer l + 1's attention receives it) scores
every head above l, and the top of those fill the rest of the budget, so exactly k units open per step. The
probe is fitted on the detection run only (runners/sparse.py `layer_probe_fit`); its cost is its weights,
read once per step (`probe_read`).

`query` (issue 19): before a closed head attends, Quest's page bounds (tracing/page_bounds.py) bound its
logits over the far keys (outside its S sinks and W recent keys) from the step's own query; the keys of each
query head's r best-bounded pages are then read, and the largest exact logit among them minus the log-mass
of the near keys it reads anyway is the unit's *pull*. A logistic score of the pull and the unit's base rate
(`QueryScorer`, fitted on the detection run) opens the unit when it beats a threshold. The threshold is the
budget: `sparse` calibrates it on the detection run so that k units open per step on average (how many open
at one step varies), see runners/sparse.py. Without a scorer the raw bound's pull is thresholded (the first
design, kept as the measured baseline).

The decision is paid for: every KV head reads its far pages' min and max (2 vectors per page of P keys
instead of P keys and P values) and the keys of the refined pages; `decision_read` gives that as a fraction
of the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynheads.errors import ConfigError
from dynheads.headsets.base import IN_LAYER, HeadSet, Step, head_set, top_k

DEFAULT_PAGE = 16  # Quest's page size (tracing/page_bounds.DEFAULT_PAGE; imported lazily: listing needs no torch)
DEFAULT_REFINE = 4  # pages whose keys the fitted `query` reads per query head (measured on the detection prompts)
PULL_FLOOR = 50.0  # a unit with no far key scores as if its pull were this far below its mean


@dataclass(frozen=True)
class QueryScorer:
    """How `query` turns a unit's far pull into a score to threshold: a logistic model fitted on the detection run.

    A unit's pull alone ranks heads by how loose their page bounds are, not by whether they retrieve (measured:
    within a unit, the bound separates its D_t steps from its others at AUC 0.64); reading the keys of the r
    pages with the highest bound makes the pull a real far logit (AUC 0.80; 0.84 for the exact one), and the
    unit's own base rate carries most of what decides D_t. So the score is
    b + w_prior · prior + w_pull · pull + w_centred · (pull − mean pull of the unit), with the unit's log-odds
    of being in D_t (`prior`) and its mean pull from the detection prompts, weights fitted there
    (runners/sparse.py `query_fit`). Arrays are [layers, units].
    """

    prior: np.ndarray
    mean_pull: np.ndarray
    weights: tuple[float, float, float]  # prior, pull, pull - mean_pull
    bias: float
    refine: int = DEFAULT_REFINE
    page: int = DEFAULT_PAGE

    def features(self, pull: np.ndarray, layer: int | None = None) -> np.ndarray:
        """float [..., units, 3]: (prior, pull, pull − mean pull) of one layer's units (`layer`) or of every
        layer (pull [..., layers, units]); a -inf pull (no far key) sits PULL_FLOOR below the unit's mean."""
        prior, mean = (self.prior, self.mean_pull) if layer is None else (self.prior[layer], self.mean_pull[layer])
        pull = np.where(np.isfinite(pull), pull, mean - PULL_FLOOR)
        return np.stack([np.broadcast_to(prior, pull.shape), pull, pull - mean], -1)

    def score(self, pull: np.ndarray, layer: int | None = None) -> np.ndarray:
        """The opening score of the units whose pulls are given (shapes as `features`)."""
        return self.features(pull, layer) @ np.asarray(self.weights) + self.bias

    def to_json(self) -> dict:
        return {"prior": self.prior.tolist(), "mean_pull": self.mean_pull.tolist(), "weights": list(self.weights),
                "bias": self.bias, "refine": self.refine, "page": self.page}

    @classmethod
    def from_json(cls, d: dict) -> "QueryScorer":
        return cls(np.asarray(d["prior"], float), np.asarray(d["mean_pull"], float), tuple(d["weights"]),
                   float(d["bias"]), int(d["refine"]), int(d["page"]))


@head_set("query")
def query_bounds(threshold: float | None = None, page: int = DEFAULT_PAGE, query_scorer: QueryScorer | None = None
                 ) -> HeadSet:
    """Units whose score from the current query beats `threshold` (calibrated on the detection run to open k units
    per step on average). Without a scorer the score is the raw Quest page bound's pull; with one (what `sparse`
    fits) it is the scorer's logistic score of the refined pull and the unit's base rate."""
    from dynheads.tracing.page_bounds import PageSummaries

    summaries = PageSummaries(page if query_scorer is None else query_scorer.page)  # kept as the cache grows
    refine = 0 if query_scorer is None else query_scorer.refine

    def choose(step: Step) -> np.ndarray:
        seen = step.need("layer_input", "the layer's query and keys")
        pull = step.units(layer_pull(seen, step.layer, summaries, refine)[None])[0]
        value = pull if query_scorer is None else query_scorer.score(pull, step.layer)
        cut = float("inf") if threshold is None else threshold
        return value > cut

    return HeadSet("query", choose, IN_LAYER)


def layer_pull(seen, layer: int, summaries, refine: int = 0) -> np.ndarray:
    """float [query heads]: each head's far pull at this layer (tracing/page_bounds.far_pull; -inf: no far key)."""
    from dynheads.tracing.page_bounds import far_pull

    sparsity = seen.sparsity
    pages = summaries.update(layer, seen.key)
    return far_pull(seen.query, seen.key, pages, sparsity.sink, sparsity.recent, seen.scale,
                    seen.visible_from, refine)[0].numpy()


def decision_read(n_keys: int, page: int, sink: int, recent: int, refine: int = 0, group: int = 1) -> float:
    """Fraction of the cache read to decide one step: each KV head's far pages, 2 vectors per page against
    2 per key for the whole cache (the near keys are read anyway, so they cost nothing extra), and with
    `refine` the keys of each of its `group` query heads' r best pages (keys only: r · P vectors each)."""
    from dynheads.tracing.page_bounds import far_pages

    pages = far_pages(n_keys, page, sink, recent)
    n_pages = pages.stop - pages.start
    if not n_keys or not n_pages:
        return 0.0
    return (n_pages + min(refine, n_pages) * group * page / 2) / n_keys


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
