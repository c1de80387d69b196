"""Multi-needle NIAH: which heads copy from which needle, and whether different needles get different heads.

`needle_index` [T, L, H] (int8, recorded per step by `run_niah` for multi-needle runs) is the needle
a head copies from at that step: the Eq. 1 copy-paste condition (top-1 position inside needle_i's
span and holding the generated token) evaluated against each needle's own span; −1 = none. Unlike
the run's score, a head that copies a distractor (multikey) counts for that distractor.

`dynheads dynamism` counts copies from each needle's *value* (`value_i` span, the UUID) by default:
every multivalue needle holds the same key and template words, so a copy of " magic words for
apricot" says little about which needle is being read. `--needle-part needle` uses whole sentences.

Choices (paper silent; README): a head *serves* needle i when it copies from it at least once
(the whole-run Jaccard matrix uses these sets). The verdict must not mistake ordinary step-to-step
turnover (claim 1) for needle specificity, so it compares like with like: each step that copies is
labelled with its needle (the one most heads copy from; ties → lower index) and its set D_t (the
heads copying from that needle); over consecutive copying steps of one sample, the Jaccard where
the needle *stays* the same is compared with the Jaccard where it *switches*. Samples with at least
one pair of each kind count; the paired difference stay − switch over samples, judged by the rule
every paired verdict uses (`stats.paired_verdict`: bootstrap 95% interval above zero, Wilcoxon
p < 0.05, at least MIN_PAIRS samples) → the model uses different heads for different needles;
otherwise that is not shown, or with fewer eligible samples "not comparable: n = …".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np

from dynheads.errors import ConfigError, DataError
from dynheads.experiments.dynamism import jaccard
from dynheads.experiments.stats import ABOVE, paired_difference, paired_verdict
from dynheads.heads import HeadLayout
from dynheads.runs import RunDir
from dynheads.scores.copy_paste import in_spans

PARTS = ("value", "needle")  # what of a needle counts as copying from it (see `run`)


def needle_index(arrays: dict[str, np.ndarray], token_spans: dict, n_needles: int, part: str = "needle") -> np.ndarray:
    """int8 [T, L, H]: the needle each head copies from at each step (Eq. 1 per `{part}_i` span), −1 = none."""
    pos, tok = arrays["top1_pos"], arrays["top1_token"]
    copies = tok == arrays["token_id"][:, None, None]
    out = np.full(pos.shape, -1, np.int8)
    for i in range(n_needles):
        out[(out < 0) & copies & in_spans(pos, token_spans[f"{part}_{i}"])] = i
    return out


@dataclass(frozen=True)
class NeedleConfig:
    """The flags of a needle analysis (names its result file when off their defaults)."""

    part: str = "value"  # what of a needle counts as copying from it: "value" or the whole "needle" sentence
    only_correct: bool = False


@dataclass
class NeedleStats:
    """Per-needle head usage of a multi-needle run, and the between/within-needle Jaccard comparison."""

    n_needles: int
    mode: str
    part: str  # "value" or "needle": what of a needle counts as copying from it
    n_samples: int
    copy_events: list[int]  # head-steps copying from needle i
    steps_with_copy: list[int]  # steps where at least one head copies from needle i
    recall: list[float | None]  # fraction of samples whose response holds needle i's value
    top_heads: list[list[tuple[str, int]]]  # per needle: (head, copy steps), most first
    pooled_jaccard: list[list[float | None]]  # [N, N] Jaccard of the run's head sets (≥ 1 copy anywhere)
    n_eligible: int  # samples with both kinds of consecutive copying-step pairs
    between: float | None  # mean per-sample Jaccard of D_t across a needle switch
    within: float | None  # mean per-sample Jaccard of D_t between consecutive copy steps of one needle
    lags: tuple[float | None, float | None]  # mean steps between the paired steps (within, between)
    difference: dict | None  # paired within − between over samples (PairedDifference as a dict)
    verdict: str = ""
    counts: list[list[int]] = field(default_factory=list)  # [N, L*H] copy steps per needle and head


def needle_head_stats(index: np.ndarray, sample_ids: np.ndarray, n_needles: int, labels: list[str],
                      mode: str = "", found: dict[str, list[float]] | None = None, top: int = 5,
                      seed: int = 0, part: str = "needle") -> NeedleStats:
    """Statistics of `index` int8 [N_steps, L, H] (see module docstring); `found`: sample → per-needle recall."""
    if not len(index):
        raise DataError("no generated steps to analyse")
    flat = index.reshape(len(index), -1)
    counts = np.stack([(flat == i).sum(0) for i in range(n_needles)])  # [N, L*H]
    served = counts > 0
    pooled = [[_nan_none(jaccard(served[i], served[j])) for j in range(n_needles)] for i in range(n_needles)]
    within, between, lags = [], [], ([], [])
    for sid in dict.fromkeys(sample_ids.tolist()):
        w, b, lag_w, lag_b = _switch_jaccards(flat[sample_ids == sid], n_needles)
        lags[0].extend(lag_w)
        lags[1].extend(lag_b)
        if w is not None and b is not None:
            within.append(w)
            between.append(b)
    diff = (asdict(paired_difference(np.array(within), np.array(between), np.random.default_rng(seed)))
            if within else None)
    recall = [_nan_none(float(np.mean([f[i] for f in found.values()]))) if found else None for i in range(n_needles)]
    return NeedleStats(
        n_needles=n_needles, mode=mode, part=part, n_samples=len(set(sample_ids.tolist())),
        copy_events=counts.sum(1).tolist(), steps_with_copy=[int((flat == i).any(1).sum()) for i in range(n_needles)],
        recall=recall,
        top_heads=[[(labels[h], int(counts[i, h])) for h in np.lexsort((np.arange(counts.shape[1]), -counts[i]))[:top]
                    if counts[i, h]] for i in range(n_needles)],
        pooled_jaccard=pooled, n_eligible=len(within),
        between=float(np.mean(between)) if between else None, within=float(np.mean(within)) if within else None,
        lags=tuple(float(np.mean(x)) if x else None for x in lags),
        difference=diff, verdict=_verdict(diff), counts=counts.tolist(),
    )


def run(run_dir: RunDir, only_correct: bool = False, part: str = "value", top: int = 5) -> NeedleStats:
    """Needle statistics of a multi-needle run: results/needles.json and figures/needle_heads.png.

    part: "value" counts copies from each needle's value (its UUID) only; "needle" from the whole
    sentence (the recorded `needle_index`), where the key and template words every needle shares count too.
    """
    from dynheads.report.needle_figures import heads_by_needle

    if part not in PARTS:
        raise ConfigError(f"unknown needle part '{part}'; choose one of: {', '.join(PARTS)}")
    cfg = run_dir.config
    n = int(cfg["task"]["num_needles"])
    layout = HeadLayout(**cfg["layout"])
    records = run_dir.read_records()
    results = {r["id"]: r for r in run_dir.sample_results()}
    if only_correct:
        records = records.select(np.array([results[s]["accuracy"] >= 1.0 for s in records.sample_ids], bool))
    found = {sid: results[sid]["needle_found"] for sid in records.samples()}
    index = np.concatenate([_sample_index(rec, results[sid]["token_spans"], n, part, sid)
                            for sid, rec in records.by_sample().items()])
    stats = needle_head_stats(index, records.sample_ids, n, layout.labels(), cfg["task"]["mode"], found, top,
                              cfg.get("seed", 0), part)
    run_dir.write_result("needles", asdict(stats), NeedleConfig(part, only_correct))
    fig = heads_by_needle(np.array(stats.counts), layout.labels(), title=f"{cfg['model']['source']}: copy steps "
                          f"per head and needle ({stats.mode}, {n} needles)")
    fig.savefig(run_dir.figure_path("needle_heads"), dpi=150, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return stats


def is_multi_needle(config: dict) -> bool:
    """True for a run folder traced with `niah --num-needles N` (N ≥ 2)."""
    return int(config.get("task", {}).get("num_needles", 1)) > 1


def format_needles(stats: NeedleStats) -> str:
    """Per-needle heads, the Jaccard matrix and the answer to 'different heads for different needles?'."""
    lines = [f"multi-needle ({stats.mode}, {stats.n_needles} needles, {stats.n_samples} samples; needle_0 is "
             f"{'the queried one' if stats.mode == 'multikey' else 'at the cell depth'}; copies from each "
             f"needle's {'value' if stats.part == 'value' else 'whole sentence'}):"]
    for i in range(stats.n_needles):
        rec = "–" if stats.recall[i] is None else f"{stats.recall[i]:.2f}"
        heads = ", ".join(f"{h} ({c})" for h, c in stats.top_heads[i]) or "none"
        lines.append(f"  needle_{i}: recalled {rec}, {stats.steps_with_copy[i]} steps copied from it; heads: {heads}")
    lines.append("  Jaccard of the heads serving each needle (whole run): " + "; ".join(
        f"{i}–{j} {_fmt(stats.pooled_jaccard[i][j])}" for i, j in combinations(range(stats.n_needles), 2)))
    lines.append(f"  consecutive copying steps ({stats.n_eligible} samples with both kinds): Jaccard of their heads "
                 f"{_fmt(stats.within)} when the needle stays (mean lag {_fmt(stats.lags[0], 2)} steps), "
                 f"{_fmt(stats.between)} when it switches (mean lag {_fmt(stats.lags[1], 2)})")
    lines.append(f"  different heads for different needles? {stats.verdict}")
    return "\n".join(lines)


def _sample_index(rec, token_spans: dict, n: int, part: str, sid: str) -> np.ndarray:
    if f"{part}_0" not in token_spans:
        raise DataError(f"sample {sid} has no '{part}_0' span (traced by an older dynheads); use --needle-part needle")
    if not len(rec):
        return np.zeros((0,) + rec.array("needle_index").shape[1:], np.int8)
    return needle_index(rec.arrays, {k: [tuple(s) for s in v] for k, v in token_spans.items()}, n, part)


def _switch_jaccards(flat: np.ndarray, n_needles: int) -> tuple[float | None, float | None, list, list]:
    """One sample [T, heads]: mean Jaccard of consecutive copying steps' D_t (stay, switch) and their lags."""
    steps = np.flatnonzero((flat >= 0).any(1))
    counts = np.stack([(flat[steps] == i).sum(1) for i in range(n_needles)], 1) if len(steps) else np.zeros((0, 1))
    label = counts.argmax(1)  # the needle most heads copy from (ties: lower index)
    stay, switch, lag_stay, lag_switch = [], [], [], []
    for k in range(len(steps) - 1):
        j = jaccard(flat[steps[k]] == label[k], flat[steps[k + 1]] == label[k + 1])
        same = label[k] == label[k + 1]
        (stay if same else switch).append(j)
        (lag_stay if same else lag_switch).append(int(steps[k + 1] - steps[k]))
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    return mean(stay), mean(switch), lag_stay, lag_switch


def _verdict(diff: dict | None) -> str:
    paired = paired_verdict(diff)
    if not paired.comparable:
        return f"not comparable: {paired.too_few('eligible samples')}"
    gap = f"stay − switch {paired.summary}"
    if paired.outcome == ABOVE:
        return f"yes: the heads change more when the copied needle switches than between steps of one needle ({gap})"
    return f"not shown: a needle switch did not change the heads clearly more than the next step of one needle ({gap})"


def _nan_none(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"
