"""Summaries of a finished ablation run (claim 2, Figs. 2-3): per-condition CIs, paired tests, the cell grid.

Pure functions of the per-sample results that `runners/ablation.py` and `runners/progressive.py` store
(`samples/<id>.json` → "conditions"); the runners call them once every sample is finished.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from dynheads.analyses.stats import bootstrap_ci, paired_difference

COMPARISONS = (("dynamic", "none"), ("dynamic", "static"), ("dynamic", "random"),
               ("dynamic", "static_excluding_dynamic"))
METRICS = ("accuracy", "rouge_l")


def summarise(per_sample: dict[str, dict[str, np.ndarray]], rng: np.random.Generator, n_boot: int = 2000,
              comparisons=COMPARISONS) -> dict:
    """Per condition: mean and 95% bootstrap CI of each metric; per comparison: paired a − b over samples.

    per_sample: condition -> metric -> [N] (the same N samples, in the same order, for every condition).
    """
    conditions = {c: {m: _describe(m, v, rng, n_boot) for m, v in metrics.items()} for c, metrics in per_sample.items()}
    tests = [{"a": a, "b": b, "metric": m, **asdict(paired_difference(per_sample[a][m], per_sample[b][m], rng, n_boot))}
             for a, b in comparisons if a in per_sample and b in per_sample for m in METRICS]
    return {"conditions": conditions, "comparisons": tests}


def cell_means(lengths: np.ndarray, depths: np.ndarray, values: np.ndarray) -> tuple[list, list, np.ndarray]:
    """Mean of `values` [N] per (depth, length) cell → (lengths, depths, [n_depths, n_lengths])."""
    ls, ds = sorted(set(lengths.tolist())), sorted(set(depths.tolist()))
    grid = np.full((len(ds), len(ls)), np.nan)
    for i, d in enumerate(ds):
        for j, l in enumerate(ls):
            sel = (depths == d) & (lengths == l)
            grid[i, j] = values[sel].mean() if sel.any() else np.nan
    return ls, ds, grid


def metric_arrays(rows: list[dict], cond: str) -> dict[str, np.ndarray]:
    """Per-sample metrics of one condition [N]; per-step lists become their per-sample mean."""
    res = [r["conditions"][cond] for r in rows]
    out = {m: np.array([x[m] for x in res], float) for m in METRICS}
    for name in ("heads_masked", "dynamic", "overlap"):
        out[f"{name}_per_step"] = np.array([np.mean(x[name]) if x[name] else np.nan for x in res])
    if "compensation" in res[0]:
        out["compensation"] = np.array([x["compensation"] for x in res], float)
    return out


def nan_to_none(grid: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in grid]


def _describe(metric: str, values: np.ndarray, rng: np.random.Generator, n_boot: int):
    """Answer metrics and compensation get a bootstrap CI; per-step means a plain mean (None if undefined)."""
    if metric in METRICS + ("compensation",):
        return asdict(bootstrap_ci(values, rng, n_boot))
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None
