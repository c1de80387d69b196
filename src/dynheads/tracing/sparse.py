"""Head-sparse decoding: open heads read every key, closed heads only sinks plus a recent window.

DuoAttention's streaming heads (Xiao et al. 2024) read the first S keys (attention sinks) and the
last W keys (recent window); its full heads read the whole cache. Here a per-step policy chooses
the open heads, and every other head attends over the S + W keys *gathered* from the cache (keys,
values and the matching mask columns), so its cost really is O(S + W), not a mask over the row.

The unit of opening is the KV head (a GQA group: its cache must be read if any of its query heads
reads it); `unit="query"` opens single query heads instead (a closed query head of a partly open
group still reads S + W keys). Both groups of heads go through the model's *stock* attention
function, so every term it applies (scaling, soft-cap, sliding-window mask, padding) is kept; with
every head open, or with at most S + W keys, the stock call is made unchanged. Only single-token
decode calls are made sparse; the prefill always reads everything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dynheads.errors import ConfigError, ModelError

UNITS = ("kv", "query")
# Per-head score terms the sparse split would have to slice per head: refused.
_PER_HEAD_TERMS = ("s_aux", "sinks", "position_bias", "indices", "block_indices")
DEFAULT_SINK = 16  # ours: DuoAttention deploys 64 + 256, a third of a 1K prompt (see README)
DEFAULT_RECENT = 64


@dataclass(frozen=True)
class Sparsity:
    """What closed heads read and how heads are counted (the policy that opens them is separate)."""

    sink: int = DEFAULT_SINK  # first keys every head reads (attention sinks)
    recent: int = DEFAULT_RECENT  # last keys every head reads (recent window, including the new token)
    unit: str = "kv"  # kv: open whole GQA groups; query: open single query heads

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ConfigError(f"unknown head unit '{self.unit}'; choose one of: {', '.join(UNITS)}")
        if self.sink < 0 or self.recent < 1:
            raise ConfigError("--sink must be >= 0 and --recent >= 1 (the new token is always read)")

    @property
    def window(self) -> int:
        return self.sink + self.recent

    def units(self, n_heads: int, n_kv_heads: int) -> int:
        """Units per layer: KV heads or query heads."""
        return n_kv_heads if self.unit == "kv" else n_heads

    def kv_read(self, open_units: np.ndarray, n_keys: int, group_size: int) -> float:
        """Fraction of the full cache read in one step: open KV heads read n_keys, closed ones S + W.

        open_units bool [L, units]. Under the query unit a KV head is read in full if any of its
        query heads is open (its keys must be loaded), else only its S + W keys.
        """
        kv_open = np.asarray(open_units, bool)
        if self.unit == "query":
            kv_open = kv_open.reshape(kv_open.shape[0], -1, group_size).any(-1)
        closed_keys = min(n_keys, self.window)
        read = kv_open.sum() * n_keys + (~kv_open).sum() * closed_keys
        return float(read / (kv_open.size * n_keys)) if n_keys else 1.0


@dataclass(frozen=True)
class HeadSplit:
    """One layer's open units as the two calls a sparse step makes: (query heads, KV heads) of each.

    A contiguous set of heads is a slice, so open heads read the cache through a view (no copy);
    a scattered set is an index tensor (its heads' keys are copied: only those of the heads read).
    Open and closed heads stay one call each, as SDPA's result for a head can depend on the heads
    batched with it (measured: 1e-8 differences between one two-head call and two one-head calls).
    """

    units: np.ndarray  # bool [units]: the layer's open units, as the policy gave them
    all_open: bool
    opened: tuple[slice | torch.Tensor, slice | torch.Tensor] | None = None
    closed: tuple[slice | torch.Tensor, slice | torch.Tensor] | None = None
    per_query: bool = False  # query unit: the calls see one KV head per query head


def split_heads(open_units: np.ndarray, unit: str, n_heads: int, n_kv: int) -> HeadSplit:
    """The calls of one layer, from its bool [units] open mask (computed once per step, not per call)."""
    open_units = np.asarray(open_units, bool)
    groups = n_heads // n_kv
    head_open = np.repeat(open_units, groups) if unit == "kv" else open_units
    if head_open.all():
        return HeadSplit(open_units, True)
    if unit == "query":  # KV head per query head: always an index (KV heads repeat)
        opened, closed = np.flatnonzero(head_open), np.flatnonzero(~head_open)
        return HeadSplit(open_units, False, _index(opened, opened // groups) if len(opened) else None,
                         _index(closed, closed // groups), per_query=True)
    return HeadSplit(open_units, False, _select(np.flatnonzero(open_units), groups),
                     _select(np.flatnonzero(~open_units), groups))


def _select(kv: np.ndarray, groups: int):
    """(query heads, KV heads) of a set of KV heads: slices when contiguous, else index tensors; None if empty."""
    if not len(kv):
        return None
    if kv[-1] - kv[0] + 1 == len(kv):
        return slice(int(kv[0]) * groups, (int(kv[-1]) + 1) * groups), slice(int(kv[0]), int(kv[-1]) + 1)
    return _index(np.concatenate([np.arange(h * groups, (h + 1) * groups) for h in kv]), kv)


def _index(heads: np.ndarray, kv: np.ndarray):
    return torch.from_numpy(heads.astype(np.int64)), torch.from_numpy(kv.astype(np.int64))


@dataclass(frozen=True)
class LayerInput:
    """What a layer's attention sees when a head set decides inside the step (IN_LAYER head sets).

    query [B, H, 1, D] and key [B, Hkv, S, D] (the cache with the new token); `visible_from` is the
    first key the step's mask lets any head see (a sliding window hides the rest); `scale` the
    attention scaling; `sparsity` what a closed head reads; `residual` [B, d] the hidden state this layer's
    attention receives for the new token (the residual stream after the layers below, through this layer's
    input norm; None where the model passes none).
    """

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    visible_from: int
    sparsity: Sparsity
    residual: torch.Tensor | None = None


# A decision inside the step: (layer, what it sees) -> bool [units] open for that layer.
LayerDecision = Callable[[int, LayerInput], np.ndarray]


def plan_step(open_units: np.ndarray, sparsity: Sparsity, n_heads: int, n_kv: int) -> list[HeadSplit]:
    """Per layer, the calls of one sparse step (open_units bool [layers, units])."""
    return [split_heads(layer, sparsity.unit, n_heads, n_kv) for layer in np.asarray(open_units, bool)]


def sparse_attention(stock: Callable, module, query, key, value, attention_mask,
                     split: HeadSplit | torch.Tensor, sparsity: Sparsity, scaling, dropout, kwargs: dict, skip: int = 0):
    """The stock attention with closed heads restricted to the gathered S + W keys.

    query [B, H, 1, D]; key/value [B, Hkv, S, D]; split: a `HeadSplit`, or the layer's bool [Hkv] or [H]
    open units. Returns ([B, 1, H, D], None), or None when nothing is restricted (the caller then calls
    the stock function). Open heads read the cache through a view when they are contiguous; closed
    heads get a copy of only their first S and last W keys (values, mask columns). skip: leading keys
    the mask hides from every head (attention._hidden_blocks), which the open heads' call does not read.
    """
    n_heads, n_kv, n_keys = query.shape[1], key.shape[1], key.shape[-2]
    if isinstance(split, torch.Tensor):
        split = split_heads(split.cpu().numpy(), sparsity.unit, n_heads, n_kv)
    if query.shape[-2] != 1 or n_keys <= sparsity.window or split.all_open:
        return None
    present = [t for t in _PER_HEAD_TERMS if kwargs.get(t) is not None]
    if present:
        raise ModelError(f"{type(module).__name__}: head-sparse decoding cannot split the per-head term '{present[0]}'")
    mod = _OneQueryHeadPerKV(module) if split.per_query else module
    sink, recent = sparsity.sink, sparsity.recent
    mask = None if attention_mask is None else attention_mask[..., :n_keys]
    out = query.new_empty(query.shape[0], 1, n_heads, query.shape[-1])
    if split.opened is not None:  # a view of the cache when the open heads are contiguous
        heads, kv = _on(split.opened[0], query.device), _on(split.opened[1], key.device)
        part_mask = mask if mask is None or mask.shape[1] == 1 else mask[:, heads]
        part_mask = part_mask if part_mask is None else part_mask[..., skip:]
        out[:, :, heads], _ = stock(mod, query[:, heads], key[:, kv, skip:], value[:, kv, skip:], part_mask,
                                    scaling=scaling, dropout=dropout, **kwargs)
    heads, kv = split.closed
    heads, kv = _on(heads, query.device), _on(kv, key.device)
    if isinstance(kv, slice):  # gather the S + W keys of these heads only: no closed head's full cache is copied
        k, v = _ends(key[:, kv], sink, recent, n_keys), _ends(value[:, kv], sink, recent, n_keys)
    else:
        k, v = _ends(key, sink, recent, n_keys)[:, kv], _ends(value, sink, recent, n_keys)[:, kv]
    part_mask = None
    if mask is not None:
        part_mask = torch.cat([mask[..., :sink], mask[..., n_keys - recent:]], dim=-1)
        part_mask = part_mask if part_mask.shape[1] == 1 else part_mask[:, heads]
    out[:, :, heads], _ = stock(mod, query[:, heads], k, v, part_mask, scaling=scaling, dropout=dropout, **kwargs)
    return out, None


def _ends(t: torch.Tensor, sink: int, recent: int, n_keys: int) -> torch.Tensor:
    """The first `sink` and last `recent` positions of [B, H, S, D] (n_keys > sink + recent), one copy."""
    return torch.cat([t[:, :, :sink], t[:, :, n_keys - recent:]], dim=2)


def _on(sel, device):
    return sel if isinstance(sel, slice) else sel.to(device)


class _OneQueryHeadPerKV:
    """An attention module seen with one query head per KV head (the query-head unit repeats the KV heads)."""

    num_key_value_groups = 1

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)
