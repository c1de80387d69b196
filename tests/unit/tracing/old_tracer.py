"""The tracer as it was before the in-place cache, for whole-run comparisons with today's.

`old_tracer(monkeypatch)` puts back, for the duration of a `with`: transformers' DynamicCache (sliding
layers as plain DynamicLayers, torch.cat per update), the prefill in one call, decode steps that read
every key (no hidden-block skipping), and the head-sparse index gather (every head set copied).
Everything else is today's code, so a difference between the two runs is one of these changes.
"""
from contextlib import contextmanager

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import dynheads.tracing.attention as attention_module
import dynheads.tracing.cache as cache_module
import dynheads.tracing.tracer as tracer_module
from dynheads.errors import ModelError
from dynheads.tracing.sparse import _PER_HEAD_TERMS, _OneQueryHeadPerKV


def dynamic_cache(config, reserve: int = 0) -> DynamicCache:
    """The tracer's cache before the in-place one."""
    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache


def index_gather(stock, module, query, key, value, attention_mask, split, sparsity, scaling, dropout, kwargs, skip=0):
    """The first head-sparse gather: index-gathers every head set (copies the open heads' whole cache)."""
    open_units = torch.from_numpy(split.units)
    n_heads, n_kv, n_keys = query.shape[1], key.shape[1], key.shape[-2]
    groups = n_heads // n_kv
    head_open = open_units.repeat_interleave(groups) if sparsity.unit == "kv" else open_units
    if query.shape[-2] != 1 or n_keys <= sparsity.window or bool(head_open.all()):
        return None
    present = [t for t in _PER_HEAD_TERMS if kwargs.get(t) is not None]
    if present:
        raise ModelError(f"{type(module).__name__}: head-sparse decoding cannot split the per-head term '{present[0]}'")
    keep = torch.cat([torch.arange(sparsity.sink), torch.arange(n_keys - sparsity.recent, n_keys)])
    out = query.new_empty(query.shape[0], 1, n_heads, query.shape[-1])
    for is_open, columns in ((True, None), (False, keep)):
        heads = torch.nonzero(head_open == is_open).flatten()
        if not heads.numel():
            continue
        kv, mod = (heads[::groups] // groups, module) if sparsity.unit == "kv" else (heads // groups, _OneQueryHeadPerKV(module))
        k, v, mask = key, value, attention_mask
        if columns is not None:
            k, v = k[:, :, columns], v[:, :, columns]
            mask = None if mask is None else mask[..., :n_keys][..., columns]
        mask = mask if mask is None or mask.shape[1] == 1 else mask[:, heads]
        out[:, :, heads] = stock(mod, query[:, heads], k[:, kv], v[:, kv], mask, scaling=scaling, dropout=dropout,
                                 **kwargs)[0]
    return out, None


@contextmanager
def old_tracer(monkeypatch):
    built = []
    with monkeypatch.context() as m:
        m.setattr(tracer_module, "croppable_cache", lambda *a, **kw: built.append(1) or dynamic_cache(*a, **kw))
        m.setattr(cache_module, "ONE_CALL", 10**9)
        m.setattr(attention_module, "KEY_BLOCK", 10**9)
        m.setattr(attention_module, "sparse_attention", index_gather)
        yield
    assert built  # the reference really ran


@contextmanager
def new_tracer(monkeypatch, chunk: int = 512):
    """Today's tracer, with prefills of more than `chunk` tokens (a multiple of 512) chunked at `chunk` so short
    prompts are chunked too; yields the lists of (query rows, keys skipped) of SDPA calls and of prefill call lengths."""
    skips, calls = [], []
    original_skip, original_chunks = attention_module._hidden_blocks, cache_module.prefill_chunks

    def chunks(*args, **kw):
        out = original_chunks(*args, **kw)
        calls.extend(hi - lo for lo, hi in out)
        return out

    with monkeypatch.context() as m:
        m.setattr(cache_module, "ONE_CALL", chunk)
        m.setattr(cache_module, "PREFILL_CHUNK", chunk)
        m.setattr(attention_module, "_hidden_blocks", lambda mask, query, n: skips.append(
            (query.shape[-2], original_skip(mask, query, n))) or skips[-1][1])
        m.setattr(tracer_module, "prefill_chunks", chunks)
        yield skips, calls


def old_and_new(monkeypatch, work, chunk: int = 512):
    """(work() on the old tracer, work() on today's, skipped blocks, prefill chunk lengths)."""
    with old_tracer(monkeypatch):
        old = work()
    with new_tracer(monkeypatch, chunk) as (skips, calls):
        new = work()
    return old, new, skips, calls


def assert_same_arrays(old: dict, new: dict, where: str = "") -> None:
    assert sorted(old) == sorted(new), where
    for name in old:
        a, b = np.asarray(old[name]), np.asarray(new[name])
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}/{name}"
        assert a.tobytes() == b.tobytes(), f"{where}/{name} differs"
