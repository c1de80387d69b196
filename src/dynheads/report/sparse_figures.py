"""Head-sparse decoding: accuracy against KV read fraction (one line per policy) and the results table.

Input is the dict `runners.sparse.summarise` returns; a matplotlib Figure (the caller saves it) or text out.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_vs_kv_read(result: dict, metric: str = "accuracy", title: str = "", ax=None):
    """One line per policy through its budgets (x: mean KV read per step, y: metric with 95% CI bars).

    Draws into `ax` when given (a panel of a larger figure), else into a new figure; returns the figure.
    """
    by_policy: dict[str, list[tuple[float, dict, int | None]]] = {}
    for cond in result["conditions"].values():
        by_policy.setdefault(cond["policy"], []).append((cond["kv_read"]["estimate"], cond[metric], cond["budget"]))
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, points in by_policy.items():
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        ys = [p[1]["estimate"] for p in points]
        err = [[y - p[1]["low"] for y, p in zip(ys, points)], [p[1]["high"] - y for y, p in zip(ys, points)]]
        if name == "oracle":  # not a policy one could deploy: it reads the whole cache (its own dense step) to decide
            ax.errorbar(xs, ys, yerr=err, marker="^", ms=4, capsize=2, linestyle="--", color="0.45",
                        label="oracle: upper bound (reads the whole cache to decide; x = what it keeps)")
            continue
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, label=name)
        for x, y, p in zip(xs, ys, points):
            if p[2] is not None:
                ax.annotate(f"k={p[2]}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KV cache read per step (fraction of full)")
    ax.set_ylabel(metric)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return ax.figure


def sparse_table(result: dict) -> str:
    """Conditions with accuracy, ROUGE-L and KV read (95% CIs), then predicted − static per budget and the verdict."""
    ci = lambda d: f"{d['estimate']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"  # noqa: E731
    lines = [f"{'condition':<14} {'accuracy':>24} {'ROUGE-L':>24} {'KV read':>24}"]
    for name, c in result["conditions"].items():
        lines.append(f"{name:<14} {ci(c['accuracy']):>24} {ci(c['rouge_l']):>24} {ci(c['kv_read']):>24}")
    for t in result["comparisons"]:
        lines.append(f"{t['a']} − {t['b']} ({t['metric']}): {t['mean_difference']:+.3f} "
                     f"[{t['low']:+.3f}, {t['high']:+.3f}], Wilcoxon p = {t['p_value']:.3g}, n = {t['n']}")
    for cond, frac in (result.get("gap_closed") or {}).items():
        if frac is None:
            lines.append(f"{cond}: no oracle − static gap to close at this budget")
        else:
            noise = "" if result.get("gap_shown", {}).get(cond, True) else \
                " (a fraction of noise: the gap itself is not shown by the paired rule)"
            lines.append(f"{cond}: closes {frac:+.2f} of the oracle − static accuracy gap{noise}")
    verdicts = result.get("verdicts") or {"predicted": result["verdict"]}
    lines += [f"verdict: {text}" for text in verdicts.values()] or [f"verdict: {result['verdict']}"]
    return "\n".join(lines)
