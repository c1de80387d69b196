"""Read a reproduction folder's result files (never the model) into one dict for the report.

Every result JSON is read through `read_result`, which also accepts results named by their parameters
(`results/cca__max_offset=3.json`), so renaming analyses does not touch the report. Table 1 gets its
95% intervals here from the run's records: a bootstrap over samples of the pooled statistics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dynheads.errors import DataError

N_BOOT = 1000


def read_result(run: Path, name: str) -> dict[str, Any] | None:
    """results/<name>.json, else the newest results/<name>__<params>.json; None when absent or unreadable."""
    folder = Path(run) / "results"
    exact = folder / f"{name}.json"
    candidates = [exact] if exact.is_file() else sorted(folder.glob(f"{name}__*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(candidates):
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


def read_samples(run: Path) -> list[dict[str, Any]]:
    """samples/*.json of a run folder in generation order (empty when the folder has none)."""
    rows = [json.loads(p.read_text()) for p in sorted((Path(run) / "samples").glob("*.json"))]
    return sorted(rows, key=lambda r: r.get("order", 0))


def figure(run: Path, name: str) -> Path | None:
    """figures/<name>.png (else .svg) when the experiment wrote it."""
    for ext in (".png", ".svg"):
        path = Path(run) / "figures" / f"{name}{ext}"
        if path.is_file():
            return path
    return None


def collect(out: str | Path) -> dict[str, Any]:
    """Everything the report shows, keyed by experiment; missing parts are None."""
    from dynheads.runners.reproduce import read_state

    out = Path(out)
    state = read_state(out)
    niah, abl, prog, mh, rag = (out / n for n in ("niah", "ablation", "progressive", "multihop", "rag"))
    niah_rows = read_samples(niah)
    offsets = state["config"]["sizes"].get("probe_offsets", [0])
    data = {
        "out": out, "state": state,
        "config": _config(out),
        "niah": {"samples": niah_rows, "dynamism": read_result(niah, "dynamism"), "cca": read_result(niah, "cca"),
                 "probes": {k: read_result(niah, f"probe_k{k}") for k in offsets},
                 "figures": {"fig1": figure(niah, "dynamism_heatmap"), "fig4": figure(niah, "cca_offsets")}},
        "ablation": {"result": read_result(abl, "ablation"), "figure": figure(abl, "ablation_heatmaps")},
        "progressive": {"result": read_result(prog, "ablation_progressive"), "figure": figure(prog, "ablation_progressive")},
        "multihop": {"result": read_result(mh, "multihop"), "regress": read_result(mh, "probe_regress_k0"),
                     "figure": figure(mh, "fig6_f1")},
        "rag": {"result": read_result(rag, "rag")},
    }
    dyn = data["niah"]["dynamism"]
    data["niah"]["table1_ci"] = table1_intervals(niah, dyn) if dyn and niah_rows else None
    return data


def table1_intervals(run: Path, dynamism: dict[str, Any], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, list]:
    """95% bootstrap intervals (over samples) of the Table 1 statistics, pooled as `dynheads dynamism` pools them.

    Needs the run's records; the static set is the one dynamism.json used. Returns {stat: [low, high]}.
    """
    from dynheads.heads import HeadLayout
    from dynheads.records import load_sample_records
    from dynheads.runs import safe_name
    from dynheads.scores.base import get_score

    cfg = json.loads((run / "config.json").read_text())
    layout = HeadLayout(**cfg["layout"])
    labels = layout.labels()
    static = np.zeros(layout.n_total, bool)
    static[[labels.index(h) for h in dynamism["stats"]["static_heads"]]] = True
    score = get_score(cfg["score"]["name"])
    keep = dynamism.get("config", {}).get("empty_steps", "skip") == "keep"
    per = []
    for row in read_samples(run):
        path = run / "records" / f"{safe_name(row['id'])}.npz"
        if not path.is_file():
            raise DataError(f"{path} is missing (the report reads the run's records)")
        active = score.active(load_sample_records(path)["score"]).reshape(-1, layout.n_total)
        per.append(sample_sums(active, static, keep))
    if not per:
        return {}
    sums = np.array([p[0] for p in per])  # [S, 6]
    counts = np.array([p[1] for p in per])  # [S, heads]
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(per), np.full(len(per), 1 / len(per)), size=n_boot).astype(float)  # [B, S]
    stats = pooled_stats(w, sums, counts)
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in stats.items()}


def pooled_stats(w: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Table 1 statistics of samples weighted by w [B, S] (bootstrap counts; all ones = the run itself).

    sums [S, 6] and counts [S, heads] come from `sample_sums`; pooled like `dynamism_stats` (micro).
    """
    tot, cnt = w @ sums, w @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {"heads_per_step_mean": tot[:, 0] / tot[:, 1], "jaccard_static": tot[:, 2] / tot[:, 3],
                 "adjacent_jaccard": tot[:, 4] / tot[:, 5], "heads_ever_active": (cnt > 0).sum(1).astype(float)}
        p = cnt / cnt.sum(1, keepdims=True)
        stats["entropy"] = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1)
    return stats


def sample_sums(active: np.ndarray, static: np.ndarray, keep: bool) -> tuple[list[float], np.ndarray]:
    """(sum of sizes, steps, sum/count of J with static, sum/count of adjacent J, per-head counts) of one sample."""
    from dynheads.analyses.dynamism import step_jaccards

    js, ja = step_jaccards(active, static, keep)
    sizes = active.sum(1)
    return [float(sizes.sum()), float(len(active)), float(sum(js)), float(len(js)), float(sum(ja)), float(len(ja))], \
        active.sum(0).astype(float)


def _config(out: Path) -> dict[str, Any] | None:
    """The first sub-run's config.json (model, fingerprint, versions)."""
    for name in ("niah", "ablation", "progressive", "multihop", "rag"):
        path = out / name / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None
