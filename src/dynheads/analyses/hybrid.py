"""Retrieval heads under hybrid attention (beyond the paper): sliding-window versus global layers.

In a hybrid model (Gemma 2/3, Cohere 2, GPT-OSS, …) most layers attend through a sliding window of
W keys (a query at position q sees keys q − W < k ≤ q) and a few attend globally. Every answer step of
a NIAH run is placed by where the needle lies from its query position q (step t feeds the token at
q = prompt length − 1 + t):

  inside       every needle token within the window: q − first needle token < W
  straddling   some needle tokens within it
  beyond       no needle token within it: q − last needle token ≥ W, so only global layers can see it

and, for `beyond`, by the distance to the needle's last token in multiples of W. Per bin: the dynamic
set's size, the share of its heads in global layers (pooled over copy steps, i.e. steps with |D_t| > 0),
the entropy of the heads' activation counts, the adjacent Jaccard of consecutive copy steps in the bin
(is retrieval still dynamic there?) and how many heads were ever active, each with a 95% bootstrap
interval over samples. `sliding_beyond` counts sliding-layer heads active on a needle outside their
window; the attention mask makes that impossible, so anything but 0 means the records are wrong.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dynheads.analyses.stats import Interval, bootstrap_metric, sample_rng
from dynheads.errors import DataError
from dynheads.heads import HeadLayout
from dynheads.records import Records
from dynheads.runs import RunDir

DISTANCE_EDGES = (1, 2, 4, 8, 16)  # beyond the window: [1W, 2W), [2W, 4W), … , ≥ 16W from the needle's end


@dataclass
class HybridBin:
    """The dynamic sets of the answer steps whose needle lies in one position class."""

    name: str
    n_samples: int
    n_steps: int
    n_copy_steps: int
    heads_per_step: Interval  # mean |D_t| over every step in the bin
    heads_per_copy_step: Interval  # mean |D_t| over copy steps
    global_share: Interval  # heads of D_t in global layers / all heads of D_t, pooled over copy steps
    entropy: Interval  # of the heads' activation counts within the bin (natural log)
    adjacent_jaccard: Interval  # consecutive copy steps, both in the bin
    heads_ever_active: int
    global_heads_ever_active: int


@dataclass
class HybridResult:
    window: int
    sliding_layers: list[int]
    global_layers: list[int]
    n_global_heads: int
    bins: list[HybridBin]  # inside, straddling, beyond (those with steps)
    distance_bins: list[HybridBin]  # beyond, split by distance in multiples of the window
    sliding_beyond: int  # sliding-layer activations on a needle outside their window (must be 0)


def needle_positions(records: Records, results: dict[str, dict], span: str = "needle") -> tuple[np.ndarray, ...]:
    """Per step [N]: query position, first and last needle token (union of the sample's `span` ranges)."""
    query, first, last = (np.zeros(len(records.step), np.int64) for _ in range(3))
    for sid in records.samples():
        sel = records.sample_ids == sid
        row = results[sid]
        spans = row["token_spans"].get(span) or []
        if not spans:
            raise DataError(f"sample {sid} has no '{span}' span: the hybrid-attention analysis needs a NIAH run")
        query[sel] = row["prompt_tokens"] - 1 + records.step[sel]
        first[sel] = min(s for s, _ in spans)
        last[sel] = max(e for _, e in spans) - 1
    return query, first, last


def position_classes(query: np.ndarray, first: np.ndarray, last: np.ndarray, window: int) -> np.ndarray:
    """'inside' | 'straddling' | 'beyond' per step (module docstring)."""
    return np.where(query - first < window, "inside", np.where(query - last >= window, "beyond", "straddling"))


def distance_classes(query: np.ndarray, last: np.ndarray, window: int) -> np.ndarray:
    """'1-2W', '2-4W', …, '≥16W' for steps beyond the window ('' inside it)."""
    ratio = (query - last) / window
    out = np.full(len(query), "", dtype=object)
    for lo, hi in zip(DISTANCE_EDGES, DISTANCE_EDGES[1:] + (math.inf,)):
        out[(ratio >= lo) & (ratio < hi)] = f"{lo}-{hi}W" if hi != math.inf else f"≥{lo}W"
    return out


def hybrid_stats(active: np.ndarray, sample_ids: np.ndarray, steps: np.ndarray, layout: HeadLayout,
                 classes: np.ndarray, names: list[str], rng_seed: int = 0, n_boot: int = 2000) -> list[HybridBin]:
    """One HybridBin per name in `names` (rows of `classes` equal to it). active: bool [N, L, H]."""
    is_global = np.zeros(layout.shape, bool)
    is_global[list(layout.global_layers)] = True
    out = []
    for name in names:
        sel = classes == name
        act, ids, st = active[sel], sample_ids[sel], steps[sel]
        sizes = act.reshape(len(act), -1).sum(1).astype(float)
        copy = sizes > 0
        n_global = (act & is_global).reshape(len(act), -1).sum(1).astype(float)
        rng = sample_rng(rng_seed, f"hybrid-{name}")
        ratio = lambda s: s[..., 0] / s[..., 1]  # noqa: E731
        entropy = lambda s: _entropy(s)  # noqa: E731
        pairs = _adjacent_pairs(act, ids, st, copy)
        out.append(HybridBin(
            name, len(np.unique(ids)), int(sel.sum()), int(copy.sum()),
            _interval(np.stack([sizes, np.ones_like(sizes)], 1), ids, ratio, rng, n_boot),
            _interval(np.stack([sizes, np.ones_like(sizes)], 1)[copy], ids[copy], ratio, rng, n_boot),
            _interval(np.stack([n_global, sizes], 1)[copy], ids[copy], ratio, rng, n_boot),
            _interval(act.reshape(len(act), -1).astype(float), ids, entropy, rng, n_boot),
            _interval(pairs[0], pairs[1], ratio, rng, n_boot),
            int(act.any(0).sum()), int((act.any(0) & is_global).sum())))
    return out


def run(run_dir: RunDir, n_boot: int = 2000) -> HybridResult | None:
    """The hybrid-attention analysis of a traced NIAH run (None for a model without both layer kinds);
    writes results/hybrid.json and figures/hybrid_attention.png."""
    layout = HeadLayout(**run_dir.config["layout"])
    if not layout.is_hybrid:
        return None
    from dynheads.report.hybrid_figures import hybrid_figure
    from dynheads.scores.base import get_score

    records = run_dir.read_records()
    results = {r["id"]: r for r in run_dir.sample_results()}
    active = get_score(run_dir.config["score"]["name"]).active(records.array("score"))
    query, first, last = needle_positions(records, results)
    window = int(layout.sliding_window)
    classes = position_classes(query, first, last, window)
    distance = distance_classes(query, last, window)
    sliding = np.zeros(layout.shape, bool)
    sliding[list(layout.sliding_layers)] = True
    beyond = classes == "beyond"
    result = HybridResult(
        window, list(layout.sliding_layers), list(layout.global_layers), len(layout.global_layers) * layout.n_heads,
        hybrid_stats(active, records.sample_ids, records.step, layout, classes,
                     [n for n in ("inside", "straddling", "beyond") if (classes == n).any()], n_boot=n_boot),
        hybrid_stats(active, records.sample_ids, records.step, layout, distance,
                     [n for n in _distance_names() if (distance == n).any()], n_boot=n_boot),
        int((active[beyond] & sliding).sum()))
    run_dir.write_result("hybrid", asdict(result))
    fig = hybrid_figure(result, title=f"{run_dir.config['model']['source']}: retrieval heads by needle position "
                        f"(window {window})")
    fig.savefig(run_dir.figure_path("hybrid_attention"), dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return result


def format_hybrid(result: HybridResult) -> str:
    """The per-bin table `dynheads dynamism` prints for a hybrid model."""
    def ci(iv: Interval, fmt: str = ".2f") -> str:
        if iv.estimate is None:
            return "–"
        lo = "?" if iv.low is None else format(iv.low, fmt)
        hi = "?" if iv.high is None else format(iv.high, fmt)
        return f"{iv.estimate:{fmt}} [{lo}, {hi}]"

    lines = [f"hybrid attention: window {result.window}, global layers {result.global_layers} "
             f"({result.n_global_heads} heads); sliding-layer heads active on a needle outside their window: "
             f"{result.sliding_beyond}",
             f"{'needle':<11}{'samples':>8}{'steps':>7}{'copy':>6}  {'heads/copy step':<20}{'global share':<22}"
             f"{'entropy':<20}{'adj. Jaccard':<20}{'ever (global)':>13}"]
    for b in result.bins + result.distance_bins:
        lines.append(f"{b.name:<11}{b.n_samples:>8}{b.n_steps:>7}{b.n_copy_steps:>6}  {ci(b.heads_per_copy_step):<20}"
                     f"{ci(b.global_share, '.3f'):<22}{ci(b.entropy):<20}{ci(b.adjacent_jaccard):<20}"
                     f"{f'{b.heads_ever_active} ({b.global_heads_ever_active})':>13}")
    return "\n".join(lines)


# --- internals -----------------------------------------------------------------------------
def _distance_names() -> list[str]:
    return [f"{lo}-{hi}W" for lo, hi in zip(DISTANCE_EDGES, DISTANCE_EDGES[1:])] + [f"≥{DISTANCE_EDGES[-1]}W"]


def _interval(rows: np.ndarray, ids: np.ndarray, metric, rng, n_boot: int) -> Interval:
    if not len(rows):
        return Interval(None, None, None, 0)
    return bootstrap_metric(rows, ids, metric, rng, n_boot)


def _entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the summed activation counts [..., heads]."""
    total = counts.sum(-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
    return np.where(total[..., 0] > 0, h, np.nan)


def _adjacent_pairs(active: np.ndarray, ids: np.ndarray, steps: np.ndarray, copy: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Rows (Jaccard, 1) for consecutive steps of one sample that are both copy steps in this bin."""
    order = np.lexsort((steps, ids))
    a, b = order[:-1], order[1:]
    keep = (ids[a] == ids[b]) & (steps[b] == steps[a] + 1) & copy[a] & copy[b]
    a, b = a[keep], b[keep]
    width = int(np.prod(active.shape[1:]))  # explicit: a bin with no consecutive copy steps has 0 rows
    flat_a, flat_b = active[a].reshape(len(a), width), active[b].reshape(len(b), width)
    inter, union = (flat_a & flat_b).sum(1), (flat_a | flat_b).sum(1)
    jac = inter / np.maximum(union, 1)
    return np.stack([jac, np.ones_like(jac)], 1).astype(float), ids[a]
