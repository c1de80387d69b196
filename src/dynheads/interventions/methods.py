"""Head ablation methods, applied inside the traced attention function to the newest query row.

Each takes one layer's newest-row output `out` [heads, head_dim], the value vectors
`values` [kv_heads, S, head_dim], the keys that row can see `visible` [S] (bool), a boolean
`mask` [heads] and the GQA group size, and returns the new output. Acting on the attention
output before the output projection means no module names (o_proj, c_proj) are involved, so
every architecture that goes through the AttentionInterface is covered.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dynheads.registry import Registry

if TYPE_CHECKING:  # torch is imported where a method runs, so `dynheads list ablations` needs no torch
    import torch

ablations: Registry = Registry("ablation method")
ablation = ablations.register


@ablation("zero")
def zero_ablation(out: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, mask: torch.Tensor,
                  groups: int) -> torch.Tensor:
    """Remove the head's output before the output projection (default; the paper does not say)."""
    return out.masked_fill(mask[:, None], 0.0)


@ablation("uniform")
def uniform_ablation(out: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, mask: torch.Tensor,
                     groups: int) -> torch.Tensor:
    """Wu et al.'s zeroed query: uniform attention over the visible keys, i.e. the mean of the values."""
    import torch

    mean_v = values[:, visible, :].float().mean(dim=1).to(out.dtype)  # [kv_heads, D]
    per_head = mean_v.repeat_interleave(groups, dim=0)  # query head h reads KV head h // groups
    return torch.where(mask[:, None], per_head, out)
