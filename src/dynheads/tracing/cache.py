"""The tracer's KV cache: transformers' DynamicCache with its attention layers written in place.

`DynamicLayer.update` appends with `torch.cat`, so every decode step copies every layer's whole
cache (at 8K tokens on SmolLM2, 30 layers × 6 MB of keys and as much of values per step). The
layer here keeps `DynamicLayer`'s semantics exactly — `keys`/`values` hold every cached token,
`get_mask_sizes` and `get_seq_length` count the filled length, `crop` drops the last tokens — but
its tensors are views of the first `length` slots of a preallocated buffer, and `update` copies
only the new tokens into place. Masks, kernels and records therefore see tensors of exactly
today's shapes and values (only their strides differ; SDPA, the eager matmuls and the recorded
row give bit-identical results on them, tested), and cropping or forking a prefill moves a length.

Why not transformers' StaticCache/StaticLayer (which also writes in place): its `update` returns
the whole `max_cache_len` buffer and its `get_mask_sizes` reports `max_cache_len`, so every kernel
would read the unfilled slots behind the mask, the recorded rows would have the buffer's length
instead of the context's (Eq. 2's local window and the head-sparse "last W keys" are counted from
the end), and it cannot grow past `max_cache_len` (in-context RAG extends a prefill). Its sliding
layers also drop keys outside the window, which would make forks impossible, as with
`DynamicSlidingWindowLayer`: here sliding layers keep every key too (the mask applies the window).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from dynheads.errors import ModelError

GROWTH = 1.25  # an update past the buffer grows it by at least this factor (amortised copies when RAG extends)
ONE_CALL = 8192  # a prefill of up to this many tokens is one call (as plain generation makes it), but for
# models with sliding-window layers, whose one call computes every key behind the window
PREFILL_CHUNK = 2048  # longer ones run in chunks ending at multiples of this (a multiple of 512)


class InPlaceLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of a buffer that updates write into in place."""

    def __init__(self, reserve: int = 0):
        super().__init__()
        self.reserve = reserve  # tokens to allocate at the first update (more if it brings more)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_buffer = self._value_buffer = None
        self._resize(key_states[..., :0, :], value_states[..., :0, :], max(self.reserve, key_states.shape[-2]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens after the filled length; return views of everything filled."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif not self._owns_views():
            # keys were replaced by a DynamicLayer method that builds new tensors (beam reorder, offload, …)
            self._resize(self.keys, self.values, self.keys.shape[-2] + key_states.shape[-2])
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.capacity:
            self._resize(self.keys, self.values, max(end, int(self.capacity * GROWTH)))
        self._key_buffer[..., start:end, :].copy_(key_states)
        self._value_buffer[..., start:end, :].copy_(value_states)
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def ensure_capacity(self, tokens: int) -> None:
        """Room for `tokens` in all: one copy of the filled part now (growing by GROWTH at least, so that
        alternating extends and generations stay amortised) instead of a growth in the middle of a step."""
        if not self.is_initialized:
            self.reserve = max(self.reserve, tokens)
        elif tokens > self.capacity:
            self._resize(self.keys, self.values, max(tokens, int(self.capacity * GROWTH)))

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()

    def _owns_views(self) -> bool:
        """keys/values are still the views this layer handed out (DynamicLayer.crop keeps them so)."""
        return all(buffer is not None and t.data_ptr() == buffer.data_ptr() and t.shape[:2] == buffer.shape[:2]
                   for t, buffer in ((self.keys, self._key_buffer), (self.values, self._value_buffer)))

    def _resize(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """New buffers of `capacity` tokens holding `keys`/`values`; the only copy of the filled part."""
        n = keys.shape[-2]
        key_buffer = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        value_buffer = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        key_buffer[..., :n, :].copy_(keys)
        value_buffer[..., :n, :].copy_(values)
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[..., :n, :], value_buffer[..., :n, :]


def croppable_cache(config, reserve: int = 0) -> DynamicCache:
    """A DynamicCache that can be cropped at any length and writes in place, so prefills can be forked,
    steps re-run, and a decode step copies only its own keys and values.

    Every attention layer (full or sliding) is an `InPlaceLayer` with room for `reserve` tokens; other
    layer types (KV-sharing dummies) are left as transformers made them. A model whose cache holds
    layers that cannot be cropped (linear attention, recurrent state) is refused.
    """
    cache = DynamicCache(config=config)
    cache.layers = [InPlaceLayer(reserve) if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    if not cache.is_croppable:
        raise ModelError(f"{config.model_type}: its cache cannot be cropped (linear-attention or other "
                         "recurrent layers), so prefills cannot be forked")
    return cache


def ensure_capacity(cache: DynamicCache, tokens: int) -> None:
    """Room for `tokens` in every in-place layer (before a generation whose length is known)."""
    for layer in cache.layers:
        if isinstance(layer, InPlaceLayer):
            layer.ensure_capacity(tokens)


def prefill_chunks(start: int, end: int, chunk: int | None = None, one_call: int | None = None,
                   windowed: bool = False) -> list[tuple[int, int]]:
    """[lo, hi) ranges that bring a cache from `start` to `end` tokens: one call up to `one_call` tokens
    (ONE_CALL, or one chunk for a `windowed` model), else calls ending at multiples of `chunk` (a multiple
    of 512: SDPA's CPU key-block size).

    Small chunks make a long prefill cheaper: each chunk's sliding-window layers read only the key
    blocks from its first query's window on (attention._hidden_blocks), and its full-attention layers
    compute a [chunk, end] rectangle, close to the causal triangle."""
    chunk = chunk or PREFILL_CHUNK
    one_call = one_call or (chunk if windowed else ONE_CALL)
    if end - start <= one_call:
        return [(start, end)]
    bounds = [start, *range((start // chunk + 1) * chunk, end, chunk), end]
    return list(zip(bounds[:-1], bounds[1:]))
