"""Quest-style page bounds: how hard a head is pulled to its far keys, from the current query alone.

Quest (Tang et al. 2024) keeps, for every page of P consecutive keys, the per-channel minimum and
maximum of the keys. For a query q the largest logit any key of the page can produce is bounded by

    ub(page) = scale * sum_i max(q_i * min_i, q_i * max_i)

because each term q_i * k_i is linear in k_i and so peaks at an end of [min_i, max_i]. Quest uses
the bound to pick pages; here it picks *heads*: a closed head reads only its S sink keys and its W
recent keys, so what it would miss is bounded by its far pages. `far_pull` compares a head's
largest far bound with the log of the softmax mass it gets from the keys it reads anyway:

    pull(h) = max over far pages of ub(page)  -  logsumexp(near logits of h)

pull > 0 means some far key *may* outweigh everything the head reads now; a very negative pull
means no far key can matter. A KV head's pull is the largest of its query heads' (its cache is
read if any of them needs it). The bound is exact (never below the true far logit, tested), cheap
(two D-vectors per page instead of 2P), and needs nothing but the query of the step.

Summaries are kept per layer and extended as the cache grows: full pages are summarised once, the
last partial page again at each step (`PageSummaries.update`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_PAGE = 16  # Quest's page size for decode-time selection


@dataclass
class LayerPages:
    """One layer's page summaries: mins/maxs [B, Hkv, pages, D] over keys [0, n_keys), pages of `page` keys."""

    mins: torch.Tensor
    maxs: torch.Tensor
    n_keys: int
    page: int


def summarise(key: torch.Tensor, page: int) -> LayerPages:
    """Per-page channel-wise min and max of key [B, Hkv, S, D] (the last page may be partial)."""
    batch, heads, n_keys, dim = key.shape
    n_pages = -(-n_keys // page)
    padded = n_pages * page
    if padded != n_keys:  # pad with the page's own last key, which changes neither min nor max
        key = torch.cat([key, key[:, :, -1:].expand(batch, heads, padded - n_keys, dim)], dim=2)
    pages = key.reshape(batch, heads, n_pages, page, dim)
    return LayerPages(pages.amin(dim=3), pages.amax(dim=3), n_keys, page)


@dataclass
class PageSummaries:
    """Page summaries of every layer, extended as each layer's cache grows (one per traced sequence)."""

    page: int = DEFAULT_PAGE
    layers: dict[int, LayerPages] = field(default_factory=dict)

    def update(self, layer: int, key: torch.Tensor) -> LayerPages:
        """The summaries of key [B, Hkv, S, D]: pages already complete are kept, the rest recomputed.

        A cache that shrank (a cropped fork) is summarised again from its first changed page.
        """
        n_keys = key.shape[2]
        old = self.layers.get(layer)
        keep = 0 if old is None else min(old.n_keys, n_keys) // self.page  # complete pages still valid
        if old is not None and old.n_keys == n_keys:
            return old
        fresh = summarise(key[:, :, keep * self.page:], self.page)
        if keep:
            fresh = LayerPages(torch.cat([old.mins[:, :, :keep], fresh.mins], dim=2),
                               torch.cat([old.maxs[:, :, :keep], fresh.maxs], dim=2), n_keys, self.page)
        self.layers[layer] = fresh
        return fresh


def far_pages(n_keys: int, page: int, sink: int, recent: int, visible_from: int = 0) -> slice:
    """Pages holding a far key: one at or after max(sink, visible_from) and before n_keys - recent.

    A page that also holds sink or recent keys is included (its bound then covers more keys than the
    far ones, so it stays an upper bound). Empty when there is no far key.
    """
    first, stop = max(sink, visible_from), n_keys - recent
    if stop <= first:
        return slice(0, 0)
    return slice(first // page, -(-stop // page))


def far_pull(query: torch.Tensor, key: torch.Tensor, pages: LayerPages, sink: int, recent: int,
             scale: float, visible_from: int = 0, refine: int = 0) -> torch.Tensor:
    """pull [B, H] of each query head (see the module docstring); -inf where a head has no far key.

    query [B, H, 1, D]; key [B, Hkv, S, D] (the near keys are read from it: S sink + W recent).
    visible_from: the first key the mask lets this step see (a sliding window hides the rest).
    refine: 0 uses the bound itself as the far logit; r > 0 reads the keys of each query head's r pages with
    the highest bound and takes their exact largest far logit (Quest's second stage: the bound picks the
    pages, the keys decide), a lower bound on the true largest far logit that is tight when the bound ranks
    the right page first.
    """
    batch, n_heads, _, dim = query.shape
    n_kv, n_keys = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    q = query[:, :, -1].float().reshape(batch, n_kv, groups, dim)
    sel = far_pages(n_keys, pages.page, sink, recent, visible_from)
    if sel.stop <= sel.start:
        return query.new_full((batch, n_heads), float("-inf"), dtype=torch.float32)
    lo, hi = pages.mins[:, :, sel].float(), pages.maxs[:, :, sel].float()  # [B, Hkv, P, D]
    bound = torch.maximum(q[:, :, :, None, :] * lo[:, :, None], q[:, :, :, None, :] * hi[:, :, None]).sum(-1)
    far_max = bound.amax(-1) * scale if refine <= 0 else _refined_max(q, key, bound, sel, pages.page, refine, scale,
                                                                     max(sink, visible_from), n_keys - recent)
    first = max(visible_from, 0)  # a sliding window may hide the sinks
    near_idx = torch.cat([torch.arange(first, max(first, min(sink, n_keys))),
                          torch.arange(max(n_keys - recent, first), n_keys)])
    near = key[:, :, near_idx].float()  # [B, Hkv, N, D]
    near_logits = torch.einsum("bkgd,bknd->bkgn", q, near) * scale
    return (far_max - torch.logsumexp(near_logits, dim=-1)).reshape(batch, n_heads)



def _refined_max(q: torch.Tensor, key: torch.Tensor, bound: torch.Tensor, sel: slice, page: int, refine: int,
                 scale: float, first: int, stop: int) -> torch.Tensor:
    """[B, Hkv, G]: exact largest logit over the far keys (positions first..stop-1) of each query head's
    `refine` pages with the highest bound. q [B, Hkv, G, D]; bound [B, Hkv, G, pages of sel]."""
    batch, n_kv, groups, dim = q.shape
    top = bound.topk(min(refine, bound.shape[-1]), dim=-1).indices + sel.start  # absolute page index
    pos = (top[..., None] * page + torch.arange(page)).reshape(batch, n_kv, groups, -1)  # [B, Hkv, G, r·P]
    valid = (pos >= first) & (pos < stop)
    rows = key[:, :, None].expand(batch, n_kv, groups, key.shape[2], dim)
    picked = torch.gather(rows, 3, pos.clamp(0, key.shape[2] - 1)[..., None].expand(-1, -1, -1, -1, dim))
    logits = torch.einsum("bkgd,bkgpd->bkgp", q, picked.float()) * scale
    return logits.masked_fill(~valid, float("-inf")).amax(-1)
