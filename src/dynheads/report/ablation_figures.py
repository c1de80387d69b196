"""Claim 2 figures: per-step ablation heatmaps (Fig. 2) and the progressive ablation curve (Fig. 3).

Arrays and interval dicts in, a matplotlib Figure out; the caller saves it.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_LABELS = {"dynamic": "dynamic", "static": "static", "random": "random",
           "static_excluding_dynamic": "static excl. dynamic"}


def ablation_heatmaps(lengths: list, depths: list, accuracy: dict[str, np.ndarray], overlap: dict[str, float | None],
                      dynamic_per_step: float | None, title: str = ""):
    """Fig. 2: accuracy per (depth, length) cell, one panel per condition; overlaps |mask ∩ D_t| in titles.

    accuracy: condition -> [n_depths, n_lengths]; red = 0, green = 1 (as the paper's colour scale).
    """
    names = list(accuracy)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 0.55 * len(lengths) * len(names) + 1.2 * len(names),
                                                     1.6 + 0.38 * len(depths)), squeeze=False)
    image = None
    for ax, name in zip(axes[0], names):
        grid = np.asarray(accuracy[name], float)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(l) for l in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ov = overlap.get(name)
        note = "" if ov is None else f"\n|masked ∩ D_t| = {ov:.1f}/step"
        ax.set_title(_LABELS.get(name, name) + note, fontsize=8)
    axes[0][0].set_ylabel("needle depth (%)", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    dyn = "" if dynamic_per_step is None else f" (mean |D_t| = {dynamic_per_step:.1f})"
    fig.suptitle((title or "NIAH accuracy with heads masked at every step") + dyn, fontsize=9)
    return fig


def progressive_curve(ks: list[int], accuracy: list[dict], compensation: list[dict], title: str = ""):
    """Fig. 3: compensated-static overlap (left axis, blue) and accuracy (right axis, red) against k.

    accuracy / compensation: one interval dict (estimate, low, high) per k; CIs drawn as bands.
    """
    fig, left = plt.subplots(figsize=(6, 3.6))
    right = left.twinx()
    for ax, series, colour, label in ((left, compensation, "tab:blue", "overlap of compensated heads with static top-20"),
                                      (right, accuracy, "tab:red", "accuracy")):
        est = np.array([_value(s, "estimate") for s in series])
        low = np.array([_value(s, "low") for s in series])
        high = np.array([_value(s, "high") for s in series])
        ax.plot(ks, est, "o-", color=colour, label=label)
        ax.fill_between(ks, low, high, color=colour, alpha=0.15)
        ax.set_ylabel(label, color=colour, fontsize=8)
        ax.tick_params(axis="y", labelcolor=colour)
    right.set_ylim(-0.05, 1.05)
    left.set_ylim(bottom=0)
    left.set_xlabel("heads masked per step (k)")
    left.set_title(title or "Progressive ablation", fontsize=9)
    fig.tight_layout()
    return fig


def _value(interval: dict, key: str) -> float:
    v = interval.get(key) if interval else None
    return np.nan if v is None else float(v)
