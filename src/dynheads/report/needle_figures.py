"""Multi-needle figure: which heads copy from which needle (arrays in, a matplotlib Figure out)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heads_by_needle(counts: np.ndarray, labels: list[str], n_heads: int = 20, title: str = ""):
    """Heads × needles: each needle's copy steps per head as a share of that needle's copy steps.

    counts: [needles, heads] copy steps; rows are the n_heads heads with the most copy steps overall.
    """
    total = counts.sum(0)
    rows = [h for h in np.lexsort((np.arange(total.size), -total))[:n_heads] if total[h]] or [0]
    share = counts[:, rows] / np.maximum(counts.sum(1, keepdims=True), 1)  # [needles, rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(counts) + 2.5, 0.32 * len(rows) + 1.6))
    im = ax.imshow(share.T, aspect="auto", cmap="Reds", vmin=0, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [labels[h] for h in rows], fontsize=8)
    ax.set_xticks(range(len(counts)), [f"needle_{i}" for i in range(len(counts))], fontsize=8)
    ax.set_xlabel("needle")
    ax.set_ylabel("head")
    fig.colorbar(im, ax=ax, label="share of the needle's copy steps")
    ax.set_title(title or "Heads that copy from each needle", fontsize=9)
    fig.tight_layout()
    return fig
