"""Bootstrap intervals, paired tests, sample splits and step pairs shared by every experiment.

Every resampling unit is a *sample* (one generated answer), never a step: steps of one answer are
strongly dependent. Every function that draws takes an `np.random.Generator`; nothing seeds globally.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np
from scipy import stats as sps

from dynheads.errors import DataError

# metric(sums [..., m]) -> [...]: a statistic computed from summed per-row statistics.
SumMetric = Callable[[np.ndarray], np.ndarray]

# The rule of every paired verdict (`paired_verdict`): claim 2, Dynamic RAG, head-sparse, multi-needle.
ALPHA = 0.05  # Wilcoxon signed-rank, two-sided
# Fewest pairs a paired verdict reads. The exact Wilcoxon test cannot reach p < 0.05 below 6 pairs at
# all (its smallest two-sided p is 2 / 2^n: 0.0625 at n = 5, 0.031 at n = 6, where every pair must agree);
# at 10 it tolerates up to 3 discordant pairs of the smallest ranks, and the percentile bootstrap interval
# resamples 10 units (at n = 1 it is the single value itself, a width-0 "interval").
MIN_PAIRS = 10
ABOVE, BELOW, NOT_SHOWN, TOO_FEW = "above zero", "below zero", "not shown", "too few pairs"


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval (None where undefined)."""

    estimate: float | None
    low: float | None
    high: float | None
    n: int  # resampling units (values or samples)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a − b over paired units, its bootstrap CI, and a Wilcoxon signed-rank p-value."""

    mean_difference: float
    low: float
    high: float
    p_value: float  # two-sided; 1.0 when every difference is zero
    n: int
    n_nonzero: int


@dataclass(frozen=True)
class MetricGap:
    """metric(a) − metric(b) on the same rows, with a bootstrap CI over samples (paired resampling)."""

    metric_a: float | None
    metric_b: float | None
    gap: float | None
    low: float | None
    high: float | None
    n_samples: int
    excludes_zero: bool  # low > 0: a beats b at the stated confidence


@dataclass(frozen=True)
class PairedVerdict:
    """What one paired difference a − b shows under the shared rule (see `paired_verdict`)."""

    outcome: str  # ABOVE or BELOW (shown), NOT_SHOWN, or TOO_FEW (not comparable)
    n: int  # pairs
    summary: str  # the difference, its interval, the test and n, for messages

    @property
    def comparable(self) -> bool:
        return self.outcome != TOO_FEW

    def too_few(self, unit: str = "pairs") -> str:
        """Why there are too few pairs (a verdict then reads "not comparable: <this>")."""
        return f"n = {self.n} {unit}, fewer than the {MIN_PAIRS} a paired verdict needs"


def paired_verdict(diff: PairedDifference | Mapping[str, Any] | None, min_pairs: int = MIN_PAIRS,
                   alpha: float = ALPHA) -> PairedVerdict:
    """The one rule of every paired verdict: a − b is shown above (below) zero when its 95% bootstrap
    interval lies above (below) zero, its Wilcoxon signed-rank p < `alpha`, and it rests on at least
    `min_pairs` pairs; with fewer pairs nothing is shown (TOO_FEW). The interval alone calls one lucky
    pair a win (its interval is that one value); the test alone ignores the size of the difference.

    `diff`: a PairedDifference or its dict (mean_difference, low, high, p_value, n); None = no pairs.
    """
    if diff is None:
        return PairedVerdict(TOO_FEW, 0, "no pairs")
    d = diff if isinstance(diff, Mapping) else asdict(diff)
    n = int(d["n"])
    summary = (f"{d['mean_difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], "
               f"Wilcoxon p = {d['p_value']:.3g}, n = {n}")
    if n < min_pairs:
        return PairedVerdict(TOO_FEW, n, summary)
    if d["p_value"] < alpha and d["low"] > 0:
        return PairedVerdict(ABOVE, n, summary)
    if d["p_value"] < alpha and d["high"] < 0:
        return PairedVerdict(BELOW, n, summary)
    return PairedVerdict(NOT_SHOWN, n, summary)


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, n_boot: int = 2000, ci: float = 0.95) -> Interval:
    """Percentile bootstrap CI of the mean of `values` [n]."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise DataError("bootstrap_ci needs at least 1 value; got 0")
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    low, high = _percentiles(values[idx].mean(axis=1), ci)
    return Interval(float(values.mean()), low, high, int(values.size))


def paired_difference(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int = 2000, ci: float = 0.95
) -> PairedDifference:
    """Mean paired difference a − b [n], bootstrap CI over units, Wilcoxon signed-rank p-value.

    All-zero differences give p = 1 (scipy's statistic is undefined there).
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise DataError(f"paired_difference needs equal lengths; got {a.size} and {b.size}")
    d = a - b
    interval = bootstrap_ci(d, rng, n_boot, ci)
    nonzero = int(np.count_nonzero(d))
    p = 1.0 if nonzero == 0 else float(sps.wilcoxon(d, zero_method="wilcox").pvalue)
    return PairedDifference(float(d.mean()), float(interval.low), float(interval.high), p, int(d.size), nonzero)


def group_sums(row_stats: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sum per-row statistics [N, m] within each group (sample) → [G, m], groups in sorted order."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    out = np.zeros((inverse.max() + 1, row_stats.shape[1]), dtype=np.float64)
    np.add.at(out, inverse, row_stats)
    return out


def bootstrap_metric(
    row_stats: np.ndarray, groups: np.ndarray, metric: SumMetric, rng: np.random.Generator,
    n_boot: int = 2000, ci: float = 0.95,
) -> Interval:
    """A metric of summed per-row statistics [N, m] with a bootstrap CI over groups (samples)."""
    per_group = group_sums(np.asarray(row_stats, dtype=np.float64), groups)
    weights = _resample_weights(per_group.shape[0], rng, n_boot)
    low, high = _percentiles(metric(weights @ per_group), ci)
    return Interval(_finite(metric(per_group.sum(axis=0))), low, high, per_group.shape[0])


def bootstrap_metric_gap(
    row_stats_a: np.ndarray, row_stats_b: np.ndarray, groups: np.ndarray, metric: SumMetric,
    rng: np.random.Generator, n_boot: int = 2000, ci: float = 0.95,
) -> MetricGap:
    """Compare two predictors' metric on the same rows; resample sample ids (not rows), paired.

    row_stats_*: [N, m] additive per-row statistics (e.g. tp, fp, fn) so a resampled metric is
    metric(counts @ per-sample sums); `groups` [N] holds each row's sample id.
    """
    if row_stats_a.shape != row_stats_b.shape:
        raise DataError(f"bootstrap_metric_gap needs equal shapes; got {row_stats_a.shape} and {row_stats_b.shape}")
    ga = group_sums(np.asarray(row_stats_a, dtype=np.float64), groups)
    gb = group_sums(np.asarray(row_stats_b, dtype=np.float64), groups)
    weights = _resample_weights(ga.shape[0], rng, n_boot)
    low, high = _percentiles(metric(weights @ ga) - metric(weights @ gb), ci)
    ma, mb = _finite(metric(ga.sum(axis=0))), _finite(metric(gb.sum(axis=0)))
    gap = None if ma is None or mb is None else ma - mb
    return MetricGap(ma, mb, gap, low, high, ga.shape[0], bool(low is not None and low > 0))


def split_by_sample(sample_ids: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Row masks [N] bool, one per fraction, splitting *samples* (never steps) at random.

    Each part gets round(fraction × n_samples) samples (at least one); the last part takes the rest.
    """
    sample_ids = np.asarray(sample_ids)
    unique = np.unique(sample_ids)
    n = unique.size
    if n < len(fractions):
        raise DataError(f"a {len(fractions)}-way split by sample needs at least {len(fractions)} samples; got {n}")
    sizes = [max(1, int(round(f * n))) for f in fractions[:-1]]
    while sum(sizes) > n - 1:  # the last part keeps at least one sample
        sizes[int(np.argmax(sizes))] -= 1
    order = unique[rng.permutation(n)]
    bounds = np.cumsum([0, *sizes, n - sum(sizes)])
    return [np.isin(sample_ids, order[bounds[i]:bounds[i + 1]]) for i in range(len(fractions))]


def offset_pairs(sample_ids: np.ndarray, steps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (source n, target n + k) of step pairs within the same sample.

    Pairs whose n + k lies outside the sample are dropped; k may be negative (a previous step).
    """
    _, code = np.unique(np.asarray(sample_ids), return_inverse=True)
    steps = np.asarray(steps, dtype=np.int64)
    span = int(steps.max()) + abs(k) + 1 if steps.size else 1
    key = code.astype(np.int64) * span + steps
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    want = key + k
    pos = np.clip(np.searchsorted(sorted_key, want), 0, max(len(key) - 1, 0))
    ok = (steps + k >= 0) & (sorted_key[pos] == want) if key.size else np.zeros(0, bool)
    src = np.flatnonzero(ok)
    return src, order[pos[ok]]


def previous_observed(sample_ids: np.ndarray, steps: np.ndarray, tgt: np.ndarray, k: int) -> np.ndarray:
    """Row of the last step observed before target n + k (−1 if none): step n + k − max(k, 1).

    For k ≥ 1 that is step n, whose scores come from the same forward pass as h_n; for k = 0 it is
    n − 1 (the target itself is step n). Used by the persistence control and the copy baseline.
    """
    rows, earlier = offset_pairs(sample_ids, steps, -max(k, 1))
    lookup = np.full(len(steps), -1, dtype=np.int64)
    lookup[rows] = earlier
    return lookup[np.asarray(tgt)]


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """An RNG seeded from (seed, a stable hash of the sample id or purpose)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _resample_weights(n_groups: int, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[n_boot, G] counts of each group in a resample with replacement."""
    if n_groups == 0:
        raise DataError("bootstrap over samples needs at least 1 sample; got 0")
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)


def _percentiles(draws: np.ndarray, ci: float) -> tuple[float | None, float | None]:
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None, None
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _finite(x) -> float | None:
    x = float(np.asarray(x))
    return x if np.isfinite(x) else None
