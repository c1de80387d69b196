"""Claim 2 figures and tables: per-step ablation heatmaps (Fig. 2), progressive curve (Fig. 3).

Arrays and interval dicts in, a matplotlib Figure (the caller saves it) or text out.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_LABELS = {"none": "unmasked", "dynamic": "dynamic", "static": "static", "random": "random",
           "static_excluding_dynamic": "static excl. dynamic"}


def ablation_heatmaps(lengths: list, depths: list, accuracy: dict[str, np.ndarray], overlap: dict[str, float | None],
                      dynamic_per_step: float | None, title: str = ""):
    """Fig. 2: accuracy per (depth, length) cell, one panel per condition; overlaps |mask ∩ D_t| in titles.

    accuracy: condition -> [n_depths, n_lengths]; red = 0, green = 1 (as the paper's colour scale).
    """
    names = list(accuracy)
    width = max(2.4, 0.6 * len(lengths) + 0.8)
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names) + 1.2, 2.2 + 0.35 * len(depths)),
                             squeeze=False, layout="constrained")
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
        note = "" if ov is None or name == "none" else f"\n|masked ∩ D_t| = {ov:.1f}/step"
        ax.set_title(_LABELS.get(name, name) + note, fontsize=8)
    axes[0][0].set_ylabel("needle depth (%)", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy", pad=0.01)
    dyn = "" if dynamic_per_step is None else f" (mean |D_t| = {dynamic_per_step:.1f})"
    fig.suptitle((title or "NIAH accuracy with heads masked at every step") + dyn, fontsize=9)
    return fig


def progressive_curve(ks: list[int], accuracy: list[dict], compensation: list[dict], static_top: int = 20,
                      title: str = ""):
    """Fig. 3: compensated-static overlap (left axis, blue) and accuracy (right axis, red) against k.

    accuracy / compensation: one interval dict (estimate, low, high) per k; CIs drawn as bands.
    """
    fig, left = plt.subplots(figsize=(6, 3.6))
    right = left.twinx()
    comp_label = f"compensated heads in static top-{static_top} (m_s)"
    for ax, series, colour, label in ((left, compensation, "tab:blue", comp_label), (right, accuracy, "tab:red", "accuracy")):
        est = np.array([_value(s, "estimate") for s in series])
        low = np.array([_value(s, "low") for s in series])
        high = np.array([_value(s, "high") for s in series])
        ax.plot(ks, est, "o-", color=colour, label=label)
        ax.fill_between(ks, low, high, color=colour, alpha=0.15)
        ax.set_ylabel(label, color=colour, fontsize=8)
        ax.tick_params(axis="y", labelcolor=colour)
    right.set_ylim(-0.05, 1.05)
    top = np.nanmax([_value(s, "high") for s in compensation] + [0.0])
    left.set_ylim(0, max(1.0, 1.1 * top))
    left.set_xlabel("heads masked per step (k)")
    left.set_title(title or "Progressive ablation", fontsize=9)
    fig.tight_layout()
    return fig


def ablation_table(result: dict) -> str:
    """Text table of results/ablation.json: accuracy / ROUGE-L per condition, paired comparisons, the paper."""
    conds = result["conditions"]
    lines = [f"{'condition':<26}{'accuracy [95% CI]':>22}{'ROUGE-L':>9}{'masked/step':>13}{'masked∩D_t':>12}"]
    for c in conds:
        m = conds[c]
        lines.append(f"{c:<26}{_ci(m['accuracy']):>22}{m['rouge_l']['estimate']:>9.3f}"
                     f"{_num(m['heads_masked_per_step']):>13}{_num(m['overlap_per_step']):>12}")
    for t in result["comparisons"]:
        lines.append(f"{t['a']} - {t['b']} ({t['metric']}): {t['mean_difference']:+.3f} "
                     f"[{t['low']:+.3f}, {t['high']:+.3f}], Wilcoxon p = {t['p_value']:.3g}, n = {t['n']}")
    lines.append(f"ours: {result['n_samples']} samples; baselines mask {_num(conds['static']['heads_masked_per_step'])} "
                 f"heads per step, the dynamic condition {_num(conds['dynamic']['heads_masked_per_step'])} "
                 f"(|D_t| unmasked: {_num(conds['none']['dynamic_per_step'])})")
    match = result.get("matching", {})
    if match.get("mean_per_step") is not None:
        n = match["heads"]
        heads = "per sample" if n is None else f"{n} head{'' if n == 1 else 's'} per step"
        lines.append(f"count matching: {heads} = {match['rule']} (mean {match['mean_per_step']:.2f} over "
                     f"{match['n_steps']} steps of {match['n_samples']} samples)")
    elif match:
        lines.append(f"count matching: {match['rule']}")
    return "\n".join(lines + [result["paper"]])


def progressive_table(result: dict) -> str:
    """Text table of results/ablation_progressive.json: accuracy, ROUGE-L and m_s per k, then the paper."""
    lines = [f"{'k':>4}{'accuracy [95% CI]':>22}{'ROUGE-L':>9}{'m_s [95% CI]':>22}{'masked/step':>13}"]
    for k in result["ks"]:
        m = result["conditions"][f"k{k}"]
        lines.append(f"{k:>4}{_ci(m['accuracy']):>22}{m['rouge_l']['estimate']:>9.3f}{_ci(m['compensation']):>22}"
                     f"{_num(m['heads_masked_per_step']):>13}")
    lines.append(f"ours: {result['n_samples']} samples; m_s = max over steps of |E_t ∩ static top set|, "
                 "mean over samples")
    lines += [result["static_note"]] if result.get("static_note") else []
    return "\n".join(lines + [result["paper"]])


def _ci(interval: dict) -> str:
    return f"{interval['estimate']:.3f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _value(interval: dict, key: str) -> float:
    v = interval.get(key) if interval else None
    return np.nan if v is None else float(v)
