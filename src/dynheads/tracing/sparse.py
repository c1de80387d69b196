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


def sparse_attention(stock: Callable, module, query, key, value, attention_mask, open_units: torch.Tensor,
                     sparsity: Sparsity, scaling, dropout, kwargs: dict):
    """The stock attention with closed heads restricted to the gathered S + W keys.

    query [B, H, 1, D]; key/value [B, Hkv, S, D]; open_units bool [Hkv] or [H]. Returns
    ([B, 1, H, D], None), or None when nothing is restricted (the caller then calls the stock function).
    """
    n_heads, n_kv, n_keys = query.shape[1], key.shape[1], key.shape[-2]
    groups = n_heads // n_kv
    head_open = open_units.to(query.device)
    head_open = head_open.repeat_interleave(groups) if sparsity.unit == "kv" else head_open
    if query.shape[-2] != 1 or n_keys <= sparsity.window or bool(head_open.all()):
        return None
    present = [t for t in _PER_HEAD_TERMS if kwargs.get(t) is not None]
    if present:
        raise ModelError(f"{type(module).__name__}: head-sparse decoding cannot split the per-head term '{present[0]}'")
    keep = torch.cat([torch.arange(min(sparsity.sink, n_keys - sparsity.recent), device=key.device),
                      torch.arange(n_keys - sparsity.recent, n_keys, device=key.device)])
    out = query.new_empty(query.shape[0], 1, n_heads, query.shape[-1])
    for is_open, columns in ((True, None), (False, keep)):
        heads = torch.nonzero(head_open == is_open).flatten()
        if not heads.numel():
            continue
        if sparsity.unit == "kv":
            kv, mod = heads[::groups] // groups, module
        else:
            kv, mod = heads // groups, _OneQueryHeadPerKV(module)
        k, v, mask = key, value, attention_mask
        if columns is not None:  # gather the S + W columns first, so no closed head's full cache is copied
            k, v = k[:, :, columns], v[:, :, columns]
            mask = None if mask is None else mask[..., :n_keys][..., columns]
        k, v = k[:, kv], v[:, kv]
        if mask is not None and mask.shape[1] > 1:
            mask = mask[:, heads]
        part, _ = stock(mod, query[:, heads], k, v, mask, scaling=scaling, dropout=dropout, **kwargs)
        out[:, :, heads] = part
    return out, None


class _OneQueryHeadPerKV:
    """An attention module seen with one query head per KV head (the query-head unit repeats the KV heads)."""

    num_key_value_groups = 1

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)
