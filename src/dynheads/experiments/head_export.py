"""Export a run's static head set for deployment, and read a DuoAttention head file back as a ranking.

`duo`: DuoAttention's `full_attention_heads.tsv` (mit-han-lab/duo-attention, duo_attn/utils.py
`save_full_attention_heads` / `load_attn_pattern`): `np.savetxt(..., delimiter="\t")` of a
layers × KV-heads float array, one row per layer, read back with `np.loadtxt(delimiter="\t")` and
clipped to [0, 1]; 1 = full (retrieval) head, 0 = streaming head. We write the top-K *query* heads
of the run's static ranking (`static_ranking.ranking_from_run`: activation frequency under the run's
score) as a GQA group: a KV head is full when any of its query heads is in the set (its cache is
needed by that query head). Values are exactly 0 or 1, so DuoAttention's `threshold=0.5`
deployment keeps exactly this set (its `sparsity` quantile option breaks ties at random instead).
Exporting into a folder also writes the `config.json` (sink_size, recent_size) that
`load_attn_pattern` reads beside the TSV (DuoAttention's deployment defaults: sink 64, recent 256).

Reading a TSV as a static ranking gives every query head the value of its KV head (DuoAttention's
`repeat_interleave` over the group); ties among the query heads of one KV head break by index.

`retrieval_head`: Wu et al.'s head_score JSON {"layer-head": [per-sample scores]} (the file
`dynheads dynamism` writes as results/head_scores.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynheads.errors import ConfigError, DataError
from dynheads.heads import HeadLayout
from dynheads.runs import RunDir

DUO_FILE = "full_attention_heads.tsv"
FORMATS = ("duo", "retrieval_head")


def kv_full_mask(query_mask: np.ndarray, layout: HeadLayout) -> np.ndarray:
    """bool [layers, kv heads]: a KV head is full when any of its query heads is in `query_mask` [L, H]."""
    return query_mask.reshape(layout.n_layers, layout.n_kv_heads, layout.group_size).any(axis=2)


def write_duo_tsv(path: Path, kv_mask: np.ndarray) -> None:
    """DuoAttention's full_attention_heads.tsv: np.savetxt of [layers, kv heads] floats, tab-separated."""
    np.savetxt(path, kv_mask.astype(float), delimiter="\t")


def ranking_from_duo_tsv(path: str | Path, layout: HeadLayout) -> np.ndarray:
    """Static ranking [L, H] from a full_attention_heads.tsv: each query head gets its KV head's gate."""
    p = Path(path)
    try:
        gates = np.loadtxt(p, dtype=float, delimiter="\t", ndmin=2)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read DuoAttention head file {p} ({str(exc).splitlines()[0]})") from None
    if gates.shape != (layout.n_layers, layout.n_kv_heads):
        raise ConfigError(f"DuoAttention head file {p} has {gates.shape[0]} layers × {gates.shape[1]} KV heads; "
                          f"the model has {layout.n_layers} × {layout.n_kv_heads}")
    return np.repeat(np.clip(gates, 0, 1), layout.group_size, axis=1)


def export_heads(run_dir: RunDir, fmt: str, out: str | Path, top: int | None = None, sink: int = 64,
                 recent: int = 256) -> dict:
    """Write the run's static set (duo: top `top` heads) or its head scores (retrieval_head); returns a summary.

    Every argument is checked before anything is computed or written."""
    from dynheads.runs import check_out_file

    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if sink < 0 or recent < 1:  # DuoAttention's streaming heads read sink_size + recent_size keys
        raise ConfigError(f"--sink must be >= 0 and --recent >= 1 (the new token is always read), got {sink} and {recent}")
    check_out_file(out, folder_ok=True)
    if "layout" not in run_dir.config:
        raise ConfigError(f"{run_dir.path} is not a traced run (no head layout in its config)")
    layout = HeadLayout(**run_dir.config["layout"])
    out = Path(out).expanduser()
    if fmt == "retrieval_head":
        return _export_head_scores(run_dir, layout, out)
    if top is None or not 1 <= top <= layout.n_total:
        raise ConfigError(f"--top must be between 1 and {layout.n_total} query heads, got {top}")
    from dynheads.experiments.dynamism import top_heads
    from dynheads.experiments.static_ranking import ranking_from_run  # imports torch: after the checks
    from dynheads.tasks.niah import NiahConfig

    ranking, source = ranking_from_run(run_dir, layout, NiahConfig(), set(), what="run")
    chosen = top_heads(ranking, top)
    kv = kv_full_mask(chosen, layout)
    folder = out.is_dir() or not out.suffix
    tsv = out / DUO_FILE if folder else out
    tsv.parent.mkdir(parents=True, exist_ok=True)
    write_duo_tsv(tsv, kv)
    if folder:
        (out / "config.json").write_text(json.dumps({"sink_size": sink, "recent_size": recent,
                                                      "source": str(run_dir.path), "top_query_heads": top}, indent=2))
    labels = layout.labels()
    return {"path": str(tsv), "format": fmt, "source": source, "query_heads": [labels[i] for i in np.flatnonzero(chosen)],
            "n_zero_score": int((ranking[chosen] == 0).sum()), "full_kv_heads": int(kv.sum()),
            "total_kv_heads": int(kv.size)}


def _export_head_scores(run_dir: RunDir, layout: HeadLayout, out: Path) -> dict:
    from dynheads.experiments.dynamism import run_head_scores, save_head_scores

    per_sample = run_head_scores(run_dir)
    if not per_sample:
        raise DataError(f"{run_dir.path} has no correctly answered sample: Wu et al.'s head scores average over "
                        "correct answers, so there is nothing to export")
    path = out / "head_scores.json" if out.is_dir() else out
    path.parent.mkdir(parents=True, exist_ok=True)
    save_head_scores(path, layout, per_sample)
    return {"path": str(path), "format": "retrieval_head", "n_samples": len(per_sample)}
