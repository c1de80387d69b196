"""Hybrid-attention figure: where retrieval heads sit as the needle leaves the sliding window."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def hybrid_figure(result, title: str = ""):
    """Global-layer share of D_t and heads per copy step, per needle-position bin, with 95% intervals.

    result: analyses.hybrid.HybridResult (bins inside / straddling / beyond, then beyond by distance).
    """
    bins = [b for b in result.bins + result.distance_bins if b.n_copy_steps]
    names = [b.name for b in bins]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.1 * len(bins) + 4), 3.4))
    for ax, field, label in ((axes[0], "global_share", "share of D_t in global layers"),
                             (axes[1], "heads_per_copy_step", "|D_t| per copy step")):
        iv = [getattr(b, field) for b in bins]
        est = np.array([i.estimate if i.estimate is not None else np.nan for i in iv], float)
        lo = np.array([i.low if i.low is not None else np.nan for i in iv], float)
        hi = np.array([i.high if i.high is not None else np.nan for i in iv], float)
        x = np.arange(len(bins))
        ax.errorbar(x, est, yerr=[np.nan_to_num(est - lo), np.nan_to_num(hi - est)], fmt="o", capsize=3)
        ax.set_xticks(x, names, rotation=30, fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlabel("needle relative to the window")
        if field == "global_share":
            ax.set_ylim(-0.05, 1.05)
            ax.axhline(len(result.global_layers) / (len(result.global_layers) + len(result.sliding_layers)),
                       ls=":", c="grey", lw=1, label="global layers' share of all layers")
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "Retrieval heads under hybrid attention", fontsize=9)
    fig.tight_layout()
    return fig
