"""Multi-hop QA figures: Fig. 6-style grid of F1 over context length × support depth (arrays in, Figure out)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def fig6_heatmap(table, title: str = ""):
    """Fig. 6 layout: context-length bins on y, support-depth bins on x, colour = mean F1, opacity = samples.

    `table` is an `runners.trace.Fig6Table` (or its dict). Empty cells stay blank, as in the paper.
    """
    t = table if isinstance(table, dict) else table.__dict__
    n = np.asarray(t["n"], float)
    f1 = np.array([[np.nan if v is None else v for v in row] for row in t["mean_f1"]], float)
    rgba = plt.get_cmap("RdYlGn")(np.nan_to_num(f1, nan=0.0))
    rgba[..., 3] = np.where(n > 0, 0.25 + 0.75 * n / max(n.max(), 1), 0.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.imshow(rgba, aspect="auto", origin="lower", interpolation="nearest")
    for (i, j), count in np.ndenumerate(n):
        if count:
            ax.text(j, i, f"{f1[i, j]:.2f}\n(n={int(count)})", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(t["depth_centres"])), [f"{d:.0f}%" for d in t["depth_centres"]], fontsize=7)
    ax.set_yticks(range(len(t["length_centres"])), [str(c) for c in t["length_centres"]], fontsize=7)
    ax.set_xlabel("support depth (mean position of the supporting facts in the context)")
    ax.set_ylabel("context length (tokens, bin centre)")
    ax.set_title(title or "F1 by context length × support depth", fontsize=9)
    fig.tight_layout()
    return fig
