"""The one attention function dynheads registers with transformers' AttentionInterface.

It delegates the attention output to the stock SDPA path (so traced generation is bit-identical
to plain generation), and only for the newest query row of a forward call computes the explicit
softmax weights of every query head, reducing them at once to the per-head quantities a
`StepHooks` asked for. Full attention matrices are never materialised. The same function applies
head ablations (to the newest row's per-head output) and key visibility masks (in-context RAG).

State reaches the function through an attribute set on each attention module by `tracing()`,
never through a module-level variable.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "dynheads"
_HOOK_ATTR = "_dynheads_hooks"

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
    captured: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> name -> [heads, …]


def traced_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, q, D]; key/value [B, Hkv, S, D] (un-repeated). Returns ([B, q, H, D], None)."""
    hooks: StepHooks | None = getattr(module, _HOOK_ATTR, None)
    if hooks is not None and hooks.hidden_keys is not None:
        attention_mask = _with_hidden_keys(attention_mask, hooks, query.shape[-2], key.shape[-2], query.device)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)
    if hooks is None or (not hooks.record and hooks.head_mask is None):
        return out, None
    layer = int(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    probs = _newest_row_probs(query, key, attention_mask, scale, kwargs.get("softcap"))  # [H, S] fp32
    offset = hooks.seq_len - key.shape[-2]  # >0 only for sliding-window caches
    if hooks.record:
        hooks.captured[layer] = _reduce(probs, hooks, offset)
    if hooks.head_mask is not None and hooks.head_mask[layer].any():
        visible = probs.sum(0) > 0  # [S]: keys the newest row can see at all
        out = out.clone()
        out[0, -1] = hooks.ablation(out[0, -1], value[0], visible, hooks.head_mask[layer].to(out.device),
                                    module.num_key_value_groups)
    return out, None


def register() -> None:
    """Register the function and its mask builder (without the latter a custom name gets no mask)."""
    AttentionInterface.register(ATTN_NAME, traced_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def tracing(model, hooks: StepHooks) -> Iterator[StepHooks]:
    """Switch `model` to the traced attention with `hooks` attached; restore everything on exit."""
    register()
    previous = model.config._attn_implementation
    modules = attention_modules(model)
    if not modules:
        raise RuntimeError("no attention modules with a layer_idx found")
    model.set_attn_implementation(ATTN_NAME)
    for m in modules:
        setattr(m, _HOOK_ATTR, hooks)
    try:
        yield hooks
    finally:
        for m in modules:
            if hasattr(m, _HOOK_ATTR):
                delattr(m, _HOOK_ATTR)
        model.set_attn_implementation(previous)


def attention_modules(model) -> list[torch.nn.Module]:
    """Self-attention modules: those carrying a layer index and a KV-group count."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


# --- internals -----------------------------------------------------------------------------
def _newest_row_probs(query, key, attention_mask, scale, softcap) -> torch.Tensor:
    """Softmax weights of the last query row of every query head, fp32, [H, S]."""
    n_heads, n_kv = query.shape[1], key.shape[1]
    groups = n_heads // n_kv
    q = query[0, :, -1, :].float().reshape(n_kv, groups, -1)  # query head h reads KV head h // groups
    k = key[0].float()  # [Hkv, S, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).reshape(n_heads, -1) * scale  # [H, S]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        row = attention_mask[0, :, -1, : key.shape[-2]]  # [1 or H, S]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    return torch.softmax(scores, dim=-1)


def _reduce(probs: torch.Tensor, hooks: StepHooks, offset: int) -> dict[str, torch.Tensor]:
    """Per-head reductions of one layer's newest attention rows [H, S] (vectorised over heads)."""
    n_keys = probs.shape[-1]
    if hooks.topk > 1:
        weights, pos = probs.topk(min(hooks.topk, n_keys), dim=-1)
        out = {"top1_pos": pos[:, 0] + offset, "topk_pos": pos + offset, "topk_weight": weights}
    else:
        out = {"top1_pos": probs.argmax(dim=-1) + offset}
    for name, ranges in hooks.spans.items():
        out[f"mass_{name}"] = sum(probs[:, max(s - offset, 0): max(e - offset, 0)].sum(-1) for s, e in ranges)
    for name, positions in hooks.row_spans.items():
        idx = torch.tensor([p - offset for p in positions], dtype=torch.long, device=probs.device)
        valid = (idx >= 0) & (idx < n_keys)  # positions not (or no longer) among the keys weigh 0
        out[f"rows_{name}"] = probs[:, idx.clamp(0, n_keys - 1)] * valid
    lo, hi = max(hooks.sink_tokens - offset, 0), max(n_keys - hooks.local_window, 0)
    out["context_mass"] = probs[:, lo:hi].sum(-1) if hi > lo else probs.new_zeros(probs.shape[0])
    return out


def _with_hidden_keys(attention_mask, hooks: StepHooks, q_len: int, kv_len: int, device) -> torch.Tensor:
    """A boolean [1, 1, q, S] mask: causal (or the given mask) and no hidden key."""
    hidden = hooks.hidden_keys[hooks.seq_len - kv_len: hooks.seq_len].to(device)
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[0, 0]
    else:
        allowed = attention_mask[0, 0] == 0
    return (allowed & ~hidden[None, :]).reshape(1, 1, q_len, kv_len)
