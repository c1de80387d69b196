"""The attention function dynheads registers with transformers' AttentionInterface.

It wraps the implementation the model would have used anyway (its *stock* implementation: the
modeling file's own eager function, SDPA, or flash attention where installed), so the attention
output — and therefore every generated token — is the stock one. Only for the newest query row of
a forward call does it also produce that row's attention weights and reduce them at once to the
per-head quantities a `StepHooks` asked for; full attention matrices are never materialised.

Where the recorded row comes from:
  eager  the stock eager function's own weights (it returns them): every term the modeling file
         applies (scaling, mask, sliding window, soft-cap, sinks, …) is in them by construction.
  sdpa   an explicit fp32 row of the newest query: scaling, the mask SDPA gets (causal, sliding
         window, padding, hidden keys) and a `position_bias`, exactly the terms SDPA applies.
  flash  the same explicit row plus the soft-cap, sinks (`s_aux`) and `sliding_window` that the
         flash kernels apply (flash attention is not installable on CPU: untested here).
A term that the stock implementation would silently ignore (attention sinks under SDPA), or that
cannot be reproduced, is refused with one `ModelError` line at the first forward call, i.e. during
the prefill and before any token is generated.

The same function applies head ablations (to the newest row's per-head output), key
visibility masks (in-context RAG) and head-sparse decoding (sparse.py: closed heads attend over
gathered sinks + recent keys; no row is recorded in such a call). State reaches it through an
attribute set on each module by `tracing()`, never through a module-level variable.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dynheads.errors import ModelError
from dynheads.tracing.sparse import HeadSplit, LayerDecision, LayerInput, Sparsity, sparse_attention, split_heads

NAME_PREFIX = "dynheads_"  # registered as dynheads_<stock>: the mask builder must be the stock one's
_HOOK_ATTR = "_dynheads_hooks"
STOCK_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
# Keyword arguments that change the attention scores, and how each stock implementation treats them.
_SCORE_TERMS = {"softcap", "s_aux", "position_bias", "sinks", "indices", "block_indices"}
_EXPLICIT_TERMS = {"sdpa": {"position_bias"}, "flash": {"softcap", "s_aux"}}
KEY_BLOCK = 512  # SDPA's CPU kernel reads keys in blocks of 512 (its kv split size)
_IGNORED_BY = {"sdpa": {"s_aux": "transformers' SDPA path ignores attention sinks (s_aux)",
                        "softcap": "transformers' SDPA path cannot apply the logit soft-cap"}}

# Ablation methods act on one layer's newest-row output [heads, head_dim] given the value
# vectors [kv_heads, S, head_dim], the visible keys [S] and a boolean head mask [heads].
AblationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class StepHooks:
    """What the attention function does during one forward call (set by the tracer)."""

    seq_len: int = 0  # total tokens (cache + this call): absolute position of the last key + 1
    record: bool = False  # reduce the newest query row of every layer
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # mass on named spans
    row_spans: dict[str, list[int]] = field(default_factory=dict)  # keep weights at these positions
    topk: int = 1
    sink_tokens: int = 4  # Eq. 2 denominator excludes the first positions …
    local_window: int = 32  # … and the most recent ones
    head_mask: torch.Tensor | None = None  # bool [layers, heads]: heads to ablate at the newest row
    ablation: AblationFn | None = None
    hidden_keys: torch.Tensor | None = None  # bool [seq_len]: keys no query of this call may see
    open_heads: list[HeadSplit] | None = None  # head-sparse decoding: per layer, the heads that read all keys
    decide: LayerDecision | None = None  # head-sparse decoding decided per layer inside the step (IN_LAYER sets)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its attention's input row (with decide)
    sparsity: Sparsity | None = None  # what closed heads read (with open_heads)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> newest row [heads, S] fp32
    stock: str = "sdpa"  # the model's own attention implementation (set by `tracing()`)
    layers_seen: set[int] = field(default_factory=set)  # layers whose attention went through us
    checked: bool = False  # the call's score terms were checked once


def traced_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, q, D]; key/value [B, Hkv, S, D] (un-repeated). Returns ([B, q, H, D], weights)."""
    hooks: StepHooks = getattr(module, _HOOK_ATTR)
    layer = int(module.layer_idx)
    hooks.layers_seen.add(layer)
    if not hooks.checked:
        _check_terms(hooks.stock, module, kwargs)
        hooks.checked = True
    if hooks.hidden_keys is not None:
        attention_mask = _with_hidden_keys(attention_mask, hooks, query, key.shape[-2])
    stock = _stock_function(module, hooks.stock)
    skip = _hidden_blocks(attention_mask, query, key.shape[-2]) if hooks.stock == "sdpa" else 0
    if hooks.open_heads is not None or hooks.decide is not None:
        if hooks.stock.startswith("flash"):
            raise ModelError("head-sparse decoding needs eager or sdpa attention, not flash")
        split = hooks.open_heads[layer] if hooks.decide is None else _decide(hooks, layer, query, key,
                                                                              attention_mask, scaling)
        sparse = sparse_attention(stock, module, query, key, value, attention_mask, split,
                                  hooks.sparsity, scaling, dropout, kwargs, skip)
        if sparse is not None:
            return sparse
    wants_row = hooks.record or hooks.head_mask is not None
    if skip:  # the leading key blocks the mask hides entirely: same output without reading them
        seen = attention_mask[..., skip:key.shape[-2]]
        out, weights = stock(module, query, key[:, :, skip:], value[:, :, skip:], seen, scaling=scaling,
                             dropout=dropout, **kwargs)
    else:
        out, weights = stock(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if not wants_row:
        return out, weights
    if hooks.stock == "eager":
        if weights is None:
            raise ModelError(f"{type(module).__name__}: its eager attention returns no weights to record")
        probs = weights[0, :, -1, :].float()  # [H, S]
    else:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probs = _explicit_row(query, key, attention_mask, scale, kwargs, skip)  # [H, S] fp32
    if key.shape[-2] != hooks.seq_len:
        raise ModelError(f"{type(module).__name__}: its cache holds {key.shape[-2]} keys for {hooks.seq_len} "
                         "positions; dynheads needs a cache that keeps every key")
    if hooks.record:
        hooks.captured[layer] = probs  # reduced for all layers at once by `reduce_rows`
    if hooks.head_mask is not None and hooks.head_mask[layer].any():
        visible = probs.sum(0) > 0  # [S]: keys the newest row can see at all
        out = out.clone()
        out[0, -1] = hooks.ablation(out[0, -1], value[0], visible, hooks.head_mask[layer].to(out.device),
                                    query.shape[1] // key.shape[1])
    return out, weights


def register(stock: str) -> str:
    """Register the function for one stock implementation, with that implementation's mask builder."""
    name = NAME_PREFIX + stock
    AttentionInterface.register(name, traced_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[stock])
    return name


@contextlib.contextmanager
def tracing(model, hooks: StepHooks) -> Iterator[StepHooks]:
    """Switch `model` to the traced attention around its stock one; restore everything on exit."""
    previous = model.config._attn_implementation
    hooks.stock = check_traceable(model)
    modules = attention_modules(model)
    model.set_attn_implementation(register(hooks.stock))
    handles = [m.register_forward_pre_hook(_note_residual, with_kwargs=True) for m in modules]
    for m in modules:
        setattr(m, _HOOK_ATTR, hooks)
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()
        for m in modules:
            if hasattr(m, _HOOK_ATTR):
                delattr(m, _HOOK_ATTR)
        model.set_attn_implementation(previous)


def _note_residual(module, args, kwargs) -> None:
    """Forward pre-hook of an attention module: while a head set decides inside the step, keep the newest row
    of the hidden state the module receives (the residual stream after the layers below, through this layer's
    input norm) for `LayerInput.residual`."""
    hooks = getattr(module, _HOOK_ATTR, None)
    if hooks is None or hooks.decide is None:
        return None
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is not None:
        hooks.residual[int(module.layer_idx)] = hidden[:, -1]
    return None


def check_traceable(model) -> str:
    """The model's stock attention implementation, or a one-line ModelError saying why it cannot be traced."""
    arch = type(model).__name__
    stock = model.config._attn_implementation or "eager"
    stock = stock.removeprefix(NAME_PREFIX)
    if stock not in STOCK_IMPLEMENTATIONS:
        raise ModelError(f"{arch}: attention implementation '{stock}' is not supported for tracing "
                         f"(use one of {', '.join(STOCK_IMPLEMENTATIONS)})")
    if not model._can_set_attn_implementation():
        raise ModelError(f"{arch}: its attention does not go through transformers' AttentionInterface, "
                         "so dynheads cannot trace it")
    if not attention_modules(model):
        raise ModelError(f"{arch}: no attention modules with a layer index found")
    if stock == "eager" and any(getattr(m, "reorder_and_upcast_attn", False) for m in attention_modules(model)):
        raise ModelError(f"{arch}: reorder_and_upcast_attn bypasses the attention interface under eager; "
                         "load the model with attn_implementation='sdpa'")
    return stock


def attention_modules(model) -> list[torch.nn.Module]:
    """Modules that carry a layer index; the attention function reads its state from them."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


# --- internals -----------------------------------------------------------------------------
def _stock_function(module, stock: str) -> Callable:
    """The function the model would call: its modeling file's eager one, or the registered stock one."""
    if stock != "eager":
        return ALL_ATTENTION_FUNCTIONS[stock]
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ModelError(f"{type(module).__name__}: its modeling file has no eager_attention_forward")
    return fn


def _check_terms(stock: str, module, kwargs: dict) -> None:
    """Refuse score terms the recorded row (or the stock output) would not carry."""
    present = {k for k in _SCORE_TERMS if kwargs.get(k) is not None}
    if stock == "eager" or not present:
        return
    family = "flash" if stock.startswith("flash") else stock
    for term in sorted(present):
        if term in _IGNORED_BY.get(family, {}):
            raise ModelError(f"{type(module).__name__}: {_IGNORED_BY[family][term]}; load the model with "
                             "attn_implementation='eager' to trace it")
        if term not in _EXPLICIT_TERMS.get(family, set()):
            raise ModelError(f"{type(module).__name__}: the attention term '{term}' cannot be reproduced in the "
                             f"recorded row under {stock}; load the model with attn_implementation='eager'")


def _explicit_row(query, key, attention_mask, scale, terms: dict, skip: int = 0) -> torch.Tensor:
    """Softmax weights of the last query row of every query head, fp32, [H, S], with the stock terms.

    skip: leading keys the mask hides (their scores are -inf without being computed; the softmax
    still runs over the whole row, so the weights are bit-identical to computing them).
    """
    n_heads, n_kv, n_keys = query.shape[1], key.shape[1], key.shape[-2]
    groups = n_heads // n_kv
    q = query[0, :, -1, :].float().reshape(n_kv, groups, -1)  # query head h reads KV head h // groups
    scores = torch.matmul(q, key[0, :, skip:].float().transpose(-1, -2)).reshape(n_heads, -1) * scale  # [H, S - skip]
    if terms.get("softcap"):
        scores = torch.tanh(scores / terms["softcap"]) * terms["softcap"]
    if terms.get("position_bias") is not None:
        scores = scores + terms["position_bias"][0, :, -1, skip:n_keys].float()
    if attention_mask is not None:
        row = attention_mask[0, :, -1, skip:n_keys]  # [1 or H, S - skip]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    elif terms.get("sliding_window"):  # flash: no mask, the kernel applies the window itself
        scores[:, : max(n_keys - int(terms["sliding_window"]), 0)] = float("-inf")
    if skip:
        scores = torch.cat([scores.new_full((n_heads, skip), float("-inf")), scores], dim=-1)
    sinks = terms.get("s_aux")
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    with_sink = torch.cat([scores, sinks.float().reshape(n_heads, 1)], dim=-1)
    return torch.softmax(with_sink, dim=-1)[:, :-1]  # the sink takes mass but is not a position


def _decide(hooks: StepHooks, layer: int, query, key, attention_mask, scaling) -> HeadSplit:
    """The layer's open units, chosen inside the step by `hooks.decide` from what the layer sees."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    seen = LayerInput(query, key, float(scale), _first_visible(attention_mask, query, key.shape[-2]), hooks.sparsity,
                      hooks.residual.get(layer))
    units = np.asarray(hooks.decide(layer, seen), bool)
    return split_heads(units, hooks.sparsity.unit, query.shape[1], key.shape[1])


def _first_visible(attention_mask, query, n_keys: int) -> int:
    """The first key any query row of the call may see under any head (0 without a mask)."""
    if attention_mask is None:
        return 0
    mask = attention_mask[0, :, -1:, :n_keys] if query.shape[-2] == 1 else attention_mask[0, :, :, :n_keys]
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    return int(visible.any(1).any(0).to(torch.uint8).argmax())


def _hidden_blocks(attention_mask, query, n_keys: int) -> int:
    """Leading keys that a boolean SDPA mask hides from every query row and head of the call (a
    sliding window, hidden context), rounded down to SDPA's key block and leaving at least one whole
    block: the stock call skips them with bit-identical output (tested), since a fully masked block is
    an exact no-op in the kernel's online softmax and the later blocks keep their boundaries and size
    (fewer than 512 keys left would shrink the kernel's block and change the last bits). Decode steps
    and prefill chunks alike (a chunk's sliding layers then read from its first query's window on);
    0 for short contexts."""
    if attention_mask is None or attention_mask.dtype != torch.bool or n_keys < 2 * KEY_BLOCK:
        return 0
    return min(_first_visible(attention_mask, query, n_keys), n_keys - KEY_BLOCK) // KEY_BLOCK * KEY_BLOCK


def reduce_rows(hooks: StepHooks, n_layers: int) -> dict[str, torch.Tensor]:
    """Per-head reductions of one step's newest attention rows, all layers at once: name -> [L, H, …].

    Deferred to the end of the step so each reduction is one vectorised op over layers and heads
    instead of one small op per layer (on CPU the per-op overhead dominates at these sizes).
    """
    device = hooks.captured[0].device  # layers may sit on different devices (device maps)
    probs = torch.stack([hooks.captured[layer].to(device) for layer in range(n_layers)])  # [L, H, S]
    n_keys = probs.shape[-1]
    if hooks.topk > 1:
        weights, pos = probs.topk(min(hooks.topk, n_keys), dim=-1)
        out = {"top1_pos": pos[..., 0], "topk_pos": pos, "topk_weight": weights}
    else:
        out = {"top1_pos": probs.argmax(dim=-1)}
    for name, ranges in hooks.spans.items():
        out[f"mass_{name}"] = sum(probs[..., s:e].sum(-1) for s, e in ranges)
    for name, positions in hooks.row_spans.items():
        idx = torch.tensor(positions, dtype=torch.long, device=probs.device)
        valid = idx < n_keys  # positions not yet among the keys weigh 0
        out[f"rows_{name}"] = probs[..., idx.clamp(0, n_keys - 1)] * valid
    lo, hi = hooks.sink_tokens, max(n_keys - hooks.local_window, 0)
    out["context_mass"] = probs[..., lo:hi].sum(-1) if hi > lo else probs.new_zeros(probs.shape[:-1])
    return out


def _with_hidden_keys(attention_mask, hooks: StepHooks, query, kv_len: int) -> torch.Tensor:
    """The stock mask with hidden keys removed, in the stock format: bool (SDPA) or additive (eager)."""
    if hooks.stock.startswith("flash"):
        raise ModelError("hiding context keys (in-context RAG) needs eager or sdpa attention, not flash")
    q_len, device = query.shape[-2], query.device
    hidden = hooks.hidden_keys[hooks.seq_len - kv_len: hooks.seq_len].to(device)
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        allowed = (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask == 0
    allowed = allowed & ~hidden
    if hooks.stock == "sdpa":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=query.dtype, device=device)
    return additive.masked_fill(~allowed, torch.finfo(query.dtype).min)
