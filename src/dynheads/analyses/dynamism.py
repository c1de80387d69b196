"""Claim 1 — dynamism: Table 1 statistics, static rankings and the Fig. 1 heatmap data.

Choices where the paper is silent (flags of DynamismConfig, reported in the README):
- Heads per step (mean ± sd) is over all answer steps, empty ones included.
- `empty_steps="skip"` (default): Jaccard with the static set is averaged over steps whose
  dynamic set is non-empty, and the adjacent Jaccard over consecutive pairs where both sets are
  non-empty; `"keep"` counts J(∅, S) = 0, J(∅, ∅) = 1 (nothing changed) and J(∅, A) = 0.
- Averages pool all steps of all samples (micro); `per_sample=True` averages per sample first.
- The static top-k is the run's own activation-frequency ranking unless a ranking file is given.
- Entropy uses p_h = (activations of h) / (all activations), natural log.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dynheads.errors import ConfigError, DataError
from dynheads.files import atomic_write
from dynheads.heads import HeadLayout
from dynheads.records import Records
from dynheads.runs import RunDir, result_name

# Paper Table 1 (Lin et al. 2026): Llama-3.1-8B-Instruct on NIAH.
PAPER_TABLE1 = {"model": "llama3.1-8b (paper)", "heads_per_step_mean": 12.97, "heads_per_step_sd": 7.69,
                "heads_ever_active": 238, "total_heads": 1024, "jaccard_static": 0.3512,
                "adjacent_jaccard": 0.2793, "entropy": 3.8154}


@dataclass(frozen=True)
class DynamismConfig:
    static_top: int = 20  # size of the static set (paper: top-20)
    empty_steps: str = "skip"  # "skip" or "keep" (paper silent; see module docstring)
    per_sample: bool = False  # average per sample first (paper silent)
    only_correct: bool = False  # restrict to samples whose answer was correct
    static_file: str | None = None  # head_score JSON of a separate detection run (else this run's ranking)
    heatmap_sample: str | None = None  # sample for Fig. 1 (default: correct sample with most activations)
    heatmap_heads: int = 10

    def __post_init__(self):
        if self.static_top < 1 or self.heatmap_heads < 1:
            raise ConfigError("dynamism needs static_top >= 1 and heatmap_heads >= 1")


@dataclass
class DynamismStats:
    """Table 1 row plus the counts behind it."""

    n_samples: int
    n_steps: int
    n_steps_without_heads: int
    heads_per_step_mean: float
    heads_per_step_sd: float
    heads_ever_active: int
    total_heads: int
    jaccard_static: float
    adjacent_jaccard: float
    entropy: float
    ln_static_top: float
    effective_heads: float
    static_heads: list[str] = field(default_factory=list)
    static_requested: int = 0  # the k of "top-k"; len(static_heads) < k when fewer heads ever scored


def activation_frequency(active: np.ndarray) -> np.ndarray:
    """Static ranking score: fraction of steps in which each head is active. active: bool [N, L, H]."""
    return active.mean(axis=0) if len(active) else np.zeros(active.shape[1:])


def top_heads(score: np.ndarray, k: int) -> np.ndarray:
    """Boolean [L, H] mask of the k highest-scoring heads (ties broken by flat index).

    Only heads with a positive score qualify: when fewer than k heads ever scored (a small model's
    frequency ranking), the set is capped at those, never padded with idle heads (callers report
    `int(mask.sum())` beside the k they asked for).
    """
    flat = score.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))[:k]
    order = order[flat[order] > 0]
    mask = np.zeros(flat.size, bool)
    mask[order] = True
    return mask.reshape(score.shape)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two boolean masks; nan when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def dynamism_stats(active: np.ndarray, sample_ids: np.ndarray, static: np.ndarray,
                   config: DynamismConfig = DynamismConfig(), labels: list[str] | None = None) -> DynamismStats:
    """Table 1 statistics. active: bool [N, L, H] (dynamic sets); static: bool [L, H]."""
    if not len(active):
        raise DataError("no generated steps to analyse")
    keep = config.empty_steps == "keep"
    if config.empty_steps not in ("skip", "keep"):
        raise ConfigError("empty_steps must be 'skip' or 'keep'")
    sizes = active.reshape(len(active), -1).sum(1)
    j_static, j_adj = [], []
    for sid in _ordered_unique(sample_ids):
        js, ja = step_jaccards(active[sample_ids == sid], static, keep)
        j_static.append(js)
        j_adj.append(ja)
    counts = active.sum(axis=0).reshape(-1).astype(float)
    p = counts / counts.sum() if counts.sum() else counts
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    flat_labels = labels or [str(i) for i in range(static.size)]
    return DynamismStats(
        n_samples=len(j_static), n_steps=len(active), n_steps_without_heads=int((sizes == 0).sum()),
        heads_per_step_mean=float(sizes.mean()), heads_per_step_sd=float(sizes.std()),
        heads_ever_active=int((counts > 0).sum()), total_heads=int(static.size),
        jaccard_static=_average(j_static, config.per_sample), adjacent_jaccard=_average(j_adj, config.per_sample),
        entropy=entropy, ln_static_top=math.log(max(int(static.sum()), 1)), effective_heads=math.exp(entropy),
        static_heads=[flat_labels[i] for i in np.flatnonzero(static.reshape(-1))],
        static_requested=config.static_top,
    )


def step_jaccards(steps: np.ndarray, static: np.ndarray, keep: bool) -> tuple[list[float], list[float]]:
    """One sample's per-step Jaccards with the static set and between adjacent steps (empty-step rule: keep/skip)."""
    js = [jaccard(s, static) if s.any() else 0.0 for s in steps if keep or s.any()]
    ja = []
    for a, b in zip(steps[:-1], steps[1:]):
        if a.any() and b.any():
            ja.append(jaccard(a, b))
        elif keep:
            ja.append(1.0 if not (a.any() or b.any()) else 0.0)
    return js, ja


def wu_sample_scores(active: np.ndarray, sample_ids: np.ndarray, span_lengths: dict[str, int],
                     correct: dict[str, bool]) -> dict[str, np.ndarray]:
    """Wu et al.'s per-sample score (hits / span length) for each correct sample: {id: [L, H]}.

    `active` must count hits on the same span whose length divides them (Wu et al.: the answer span
    `real_needle`); `span_hits` recomputes them there.
    """
    out = {}
    for sid in _ordered_unique(sample_ids):
        if correct.get(sid):
            out[sid] = active[sample_ids == sid].sum(0) / max(span_lengths[sid], 1)
    return out


def span_hits(score, records: Records, token_spans: dict[str, dict], span: str) -> np.ndarray:
    """bool [N, L, H]: the run's score recomputed per sample on `span` (e.g. the answer), then `score.active`.

    score: a registered HeadScore whose inputs do not depend on the span (Eq. 1: top-1 positions and
    tokens), so the hits of Wu et al.'s score lie in the span its length is taken from.
    """
    out = np.zeros(records.array("score").shape, bool)
    for sid in records.samples():
        sel = records.sample_ids == sid
        arrays = {k: v[sel] for k, v in records.arrays.items()}
        out[sel] = score.active(score(arrays, token_spans[sid], span=span))
    return out


def most_variable_heads(active_sample: np.ndarray, k: int = 10) -> np.ndarray:
    """Flat indices of the k heads whose binary score varies most over one sample's steps [T, L, H]."""
    var = active_sample.reshape(len(active_sample), -1).astype(float).var(axis=0)
    return np.lexsort((np.arange(var.size), -var))[:k]


def save_head_scores(path: Path, layout: HeadLayout, per_sample: dict[str, np.ndarray]) -> None:
    """Retrieval_Head's head_score layout: {"layer-head": [score of each sample]}."""
    data = {f"{l}-{h}": [float(s[l, h]) for s in per_sample.values()]
            for l in range(layout.n_layers) for h in range(layout.n_heads)}
    atomic_write(path, json.dumps(data))


def load_head_scores(path: str | Path, layout: HeadLayout) -> np.ndarray:
    """Mean score per head [L, H] from a Retrieval_Head-style file; heads must fit the model."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"cannot read head-score file {p} (expected JSON {{\"layer-head\": [scores]}})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"head-score file {p} is not a JSON object")
    out = np.zeros(layout.shape)
    for key, values in data.items():
        l, h = layout.parse(key)
        out[l, h] = float(np.mean(values)) if isinstance(values, list) and values else float(values or 0)
    return out


def run(run_dir: RunDir, config: DynamismConfig = DynamismConfig()) -> DynamismStats:
    """Compute Table 1 + head scores + Fig. 1 for a traced run and write them into the run folder
    (results/dynamism.json and head_scores.json, plus copies named by the flags off their defaults)."""
    from dynheads.report.figures import dynamism_heatmap
    from dynheads.scores.base import get_score

    cfg = run_dir.config
    layout = HeadLayout(**cfg["layout"])
    records = run_dir.read_records()
    results = {r["id"]: r for r in run_dir.sample_results()}
    score = get_score(cfg["score"]["name"])
    active = score.active(records.array("score"))
    correct = {sid: r.get("accuracy", r.get("em", 0.0)) >= 1.0 for sid, r in results.items()}
    if config.only_correct:
        keep = np.array([correct[s] for s in records.sample_ids], bool)
        records, active = records.select(keep), active[keep]
    static = (top_heads(load_head_scores(config.static_file, layout), config.static_top) if config.static_file
              else top_heads(activation_frequency(active), config.static_top))
    stats = dynamism_stats(active, records.sample_ids, static, config, layout.labels())
    run_dir.write_result("dynamism", {
        "stats": asdict(stats), "config": asdict(config), "paper": PAPER_TABLE1,
        "frequency": dict(zip(layout.labels(), activation_frequency(active).reshape(-1)))}, config)
    head_scores = _wu_scores(cfg, results, records, active, score)
    for name in dict.fromkeys(("head_scores", result_name("head_scores", config))):  # latest, and named by flags
        save_head_scores(run_dir.path / "results" / f"{name}.json", layout, head_scores)
    sid = config.heatmap_sample or _heatmap_sample(active, records, correct)
    if sid not in results:
        raise ConfigError(f"sample '{sid}' is not in {run_dir.path}")
    sel = records.sample_ids == sid
    heads = most_variable_heads(active[sel], config.heatmap_heads)
    fig = dynamism_heatmap(active[sel].reshape(sel.sum(), -1)[:, heads].T, [layout.labels()[i] for i in heads],
                           results[sid]["tokens"], title=f"{cfg['model']['source']} — {sid}")
    _save(fig, run_dir.figure_path("dynamism_heatmap"))
    return stats


def run_head_scores(run_dir: RunDir) -> dict[str, np.ndarray]:
    """Wu et al.'s per-sample head scores of a run's correct samples (what results/head_scores.json holds)."""
    from dynheads.scores.base import get_score

    records = run_dir.read_records()
    results = {r["id"]: r for r in run_dir.sample_results()}
    score = get_score(run_dir.config["score"]["name"])
    return _wu_scores(run_dir.config, results, records, score.active(records.array("score")), score)


def format_table(stats: DynamismStats, model_name: str) -> str:
    """Our Table 1 row beside the paper's Llama-3.1-8B row."""
    head = f"{'model':<26}{'heads/step':>16}{'ever active':>14}{'J static':>10}{'J adj':>8}{'entropy':>9}"
    rows = [(model_name, stats.heads_per_step_mean, stats.heads_per_step_sd, stats.heads_ever_active,
             stats.total_heads, stats.jaccard_static, stats.adjacent_jaccard, stats.entropy)]
    p = PAPER_TABLE1
    rows.append((p["model"], p["heads_per_step_mean"], p["heads_per_step_sd"], p["heads_ever_active"],
                 p["total_heads"], p["jaccard_static"], p["adjacent_jaccard"], p["entropy"]))
    lines = [head] + [f"{m:<26}{mu:>9.2f} ± {sd:<4.2f}{f'{ev}/{tot}':>14}{js:>10.4f}{ja:>8.4f}{en:>9.4f}"
                      for m, mu, sd, ev, tot, js, ja, en in rows]
    lines.append(f"ln {int(round(math.exp(stats.ln_static_top)))} = {stats.ln_static_top:.4f}; "
                 f"{stats.n_samples} samples, {stats.n_steps} steps ({stats.n_steps_without_heads} with no active head)")
    note = static_cap_note(len(stats.static_heads), stats.static_requested)
    return "\n".join(lines + ([note] if note else []))


def static_cap_note(n_static: int, requested: int) -> str:
    """One line when the static top-k had to be capped at the heads that ever scored ('' otherwise)."""
    if n_static >= requested:
        return ""
    return (f"note: only {n_static} heads have a positive static score, so the static set is capped at "
            f"{n_static} (asked for top-{requested}; idle heads are never added)")


def _wu_scores(cfg: dict, results: dict[str, dict], records: Records, active: np.ndarray,
               score) -> dict[str, np.ndarray]:
    """Per-sample Wu scores of the correctly answered samples: hits counted and divided on one span.

    The answer span (Wu et al.'s real_needle) when the samples have one and the score can be recomputed
    there (it needs no recorded span masses, as Eq. 1, and the records hold its inputs); else the score's
    own span, for the hits `active` and the length alike.
    """
    correct = {sid: r.get("accuracy", r.get("em", 0.0)) >= 1.0 for sid, r in results.items()}
    span, hits = cfg["score"]["args"].get("span", "needle"), active
    recomputable = not score.mass_spans and all(n in records.names for n in score.needs)
    if "answer" in next(iter(results.values()))["token_spans"] and recomputable:
        span = "answer"
        hits = span_hits(score, records, {sid: r["token_spans"] for sid, r in results.items()}, span)
    lengths = {sid: sum(e - s for s, e in r["token_spans"].get(span, [])) for sid, r in results.items()}
    return wu_sample_scores(hits, records.sample_ids, lengths, correct)


def _heatmap_sample(active: np.ndarray, records: Records, correct: dict[str, bool]) -> str:
    best, best_n = None, -1
    for sid in records.samples():
        n = int(active[records.sample_ids == sid].sum()) + (10**6 if correct.get(sid) else 0)
        if n > best_n:
            best, best_n = sid, n
    return best


def _average(groups: list[list[float]], per_sample: bool) -> float:
    if per_sample:
        means = [float(np.mean(g)) for g in groups if g]
        return float(np.mean(means)) if means else float("nan")
    flat = [v for g in groups for v in g]
    return float(np.mean(flat)) if flat else float("nan")


def _ordered_unique(ids: np.ndarray) -> list:
    _, first = np.unique(ids, return_index=True)
    return [ids[i] for i in sorted(first)]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
