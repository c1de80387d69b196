"""One function per figure: arrays in, a matplotlib Figure out (the caller saves it)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def dynamism_heatmap(scores: np.ndarray, head_labels: list[str], tokens: list[str], title: str = ""):
    """Fig. 1: per-step retrieval scores [heads, steps] of the most variable heads, tokens on x."""
    n_heads, n_steps = scores.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * n_steps + 2), 0.4 * n_heads + 1.8))
    ax.imshow(scores, aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(n_heads), head_labels, fontsize=8)
    ax.set_xticks(range(n_steps), [repr(t)[1:-1] for t in tokens[:n_steps]], rotation=90, fontsize=7)
    ax.set_xlabel("generated token")
    ax.set_ylabel("head")
    ax.set_title(title or "Retrieval heads per generated token", fontsize=9)
    fig.tight_layout()
    return fig
