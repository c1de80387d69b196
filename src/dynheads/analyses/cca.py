"""Claim 3: canonical correlation between the final hidden state at step n and all heads' scores at n + k.

Sec. 3.4 / App. A.4 (Fig. 4, Fig. 8). Deviations, all reported beside the paper's in-sample numbers:
held-out correlations on a split by sample (the headline), a shuffled-pairing null, and two controls
in place of the hidden state (previous score vector = persistence, one-hot step index = position).
CCA is solved exactly (whitening + SVD) rather than by scikit-learn's iterative NIPALS `CCA`, which
gives the same canonical pairs but takes ~a minute per fit at the paper's sizes (tested equal).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from dynheads.analyses.stats import Interval, MetricGap, bootstrap_metric, bootstrap_metric_gap, offset_pairs, previous_observed, split_by_sample
from dynheads.errors import ConfigError, DataError
from dynheads.runs import RunDir

PAPER_FIG4_TOP1 = (0.965, 0.931, 0.915, 0.835, 0.816, 0.805, 0.792, 0.776, 0.753, 0.742, 0.743)
MIN_SAMPLES = 5  # at least 3 train and 2 test samples at the default split
MIN_PAIRS = 3  # per side of the split, for an offset to be evaluated


@dataclass(frozen=True)
class CcaConfig:
    """Settings of the temporal-offset CCA (App. A.4)."""

    max_offset: int = 10  # k = 0..max_offset, as Fig. 4
    n_components: int = 50  # paper: 50; capped at what the data allows
    hidden_variance: float = 0.95  # paper: PCA keeps 95% of hidden-state variance
    score_variance: float = 0.99  # paper: PCA keeps 99% of score variance (after min-max to [0,1])
    train_fraction: float = 0.7  # paper reports in-sample only; our held-out split is by sample
    position_bins: int = 128  # position control: one-hot step index, steps beyond share the last bin
    n_boot: int = 1000  # bootstrap resamples (over test samples) for CIs
    ci: float = 0.95
    seed: int = 0
    threads: int = 1  # BLAS threads; 1 avoids oversubscription on shared cores (3x faster under load), 0 = default

    def __post_init__(self):
        if self.max_offset < 0 or self.n_components < 1 or not 0 < self.train_fraction < 1:
            raise ConfigError("cca needs max_offset >= 0, n_components >= 1 and 0 < train_fraction < 1")


@dataclass
class Canonical:
    """Canonical correlations (in component order) and the paper's summaries of them."""

    correlations: list[float]
    top1: float
    top10_mean: float
    top50_mean: float


@dataclass
class OffsetCca:
    """All statistics at one offset k; held-out values are the headline."""

    k: int
    n_pairs: int
    n_train_pairs: int
    n_test_pairs: int
    in_sample: Canonical  # fit and evaluated on all pairs (the paper's numbers)
    heldout: Canonical  # fit on train samples, correlations of projected test pairs
    heldout_top1_ci: Interval  # bootstrap over test samples
    null: Canonical  # held-out after shuffling the X–Y pairing within train and within test
    persistence: Canonical  # held-out, X = score vector at step n + k − max(k, 1)
    position: Canonical  # held-out, X = one-hot step index n
    margin_over_persistence: MetricGap  # held-out top-1: hidden − persistence
    margin_over_position: MetricGap  # held-out top-1: hidden − position


@dataclass
class CcaResult:
    config: CcaConfig
    n_samples: int
    n_train_samples: int
    n_test_samples: int
    n_heads: int
    n_constant_heads: int  # heads whose score never varies (kept; they carry no variance)
    pca_dims: dict[str, int]  # retained PCA components, in-sample fit
    offsets: list[OffsetCca]
    skipped_offsets: list[dict] = field(default_factory=list)  # {"k", "reason"}: too few pairs
    paper_top1: list[float] = field(default_factory=lambda: list(PAPER_FIG4_TOP1))


def temporal_cca(
    hidden: np.ndarray, scores: np.ndarray, sample_ids: np.ndarray, steps: np.ndarray,
    offsets, config: CcaConfig, rng: np.random.Generator,
) -> CcaResult:
    """Canonical correlations of hidden [N, d] at step n with scores [N, L, H] at step n + k, per k.

    Pairs stay within a sample. Min-max and PCA are fit once per split on every step's row (not per k);
    held-out values fit them and the CCA on train samples only and correlate the projected test pairs.
    """
    with threadpool_limits(config.threads or None):
        return _temporal_cca(hidden, scores, sample_ids, steps, offsets, config, rng)


def run(run: RunDir, config: CcaConfig = CcaConfig()) -> CcaResult:
    """Read a run's records, write results/cca.json (and, with flags off their defaults, a copy named by
    them: results/cca__max_offset=3.json) and figures/cca_offsets.png (+ .svg)."""
    records = run.read_records()
    result = temporal_cca(
        records.hidden(), records.array("score"), records.sample_ids, records.step,
        range(config.max_offset + 1), config, np.random.default_rng(config.seed),
    )
    run.write_result("cca", result, config)
    fig, path = cca_figure(result), run.figure_path("cca_offsets")
    fig.savefig(path, dpi=150)
    fig.savefig(path.with_suffix(".svg"))
    return result


def cca_figure(result: CcaResult) -> Figure:
    """Fig. 4: correlation vs k (paper's in-sample summaries, our held-out, null, controls)."""
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot()
    ks = [o.k for o in result.offsets]
    lines = {
        "in-sample top-1": ([o.in_sample.top1 for o in result.offsets], "C0", "-"),
        "in-sample top-10 mean": ([o.in_sample.top10_mean for o in result.offsets], "C0", "--"),
        "in-sample top-50 mean": ([o.in_sample.top50_mean for o in result.offsets], "C0", ":"),
        "held-out top-1 (hidden)": ([o.heldout.top1 for o in result.offsets], "C3", "-"),
        "held-out null (shuffled)": ([o.null.top1 for o in result.offsets], "0.5", "-"),
        "held-out persistence": ([o.persistence.top1 for o in result.offsets], "C2", "-"),
        "held-out position": ([o.position.top1 for o in result.offsets], "C1", "-"),
    }
    for label, (ys, color, style) in lines.items():
        ax.plot(ks, ys, color=color, linestyle=style, marker="o", ms=3, label=label)
    lo = [np.nan if o.heldout_top1_ci.low is None else o.heldout_top1_ci.low for o in result.offsets]
    hi = [np.nan if o.heldout_top1_ci.high is None else o.heldout_top1_ci.high for o in result.offsets]
    ax.fill_between(ks, lo, hi, color="C3", alpha=0.15, linewidth=0)
    paper = result.paper_top1
    ax.plot(range(len(paper)), paper, color="k", linestyle="--", lw=1, label="paper Fig. 4 top-1")
    ax.set(xlabel="offset k (steps ahead)", ylabel="canonical correlation", title="Hidden state at n vs head scores at n+k")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def format_cca_table(result: CcaResult) -> str:
    """Per-k table: paper top-1, in-sample summaries, held-out top-1 [CI], null and controls."""
    head = f"{'k':>3} {'paper':>6} {'in top1':>7} {'top10':>6} {'top50':>6} {'held-out top1 [95% CI]':>24} {'null':>6} {'persist':>7} {'position':>8}"
    rows = [head]
    for o in result.offsets:
        paper = f"{result.paper_top1[o.k]:.3f}" if o.k < len(result.paper_top1) else "-"
        ci = o.heldout_top1_ci
        band = f"[{ci.low:.3f}, {ci.high:.3f}]" if ci.low is not None else "[-]"
        rows.append(
            f"{o.k:>3} {paper:>6} {o.in_sample.top1:7.3f} {o.in_sample.top10_mean:6.3f} {o.in_sample.top50_mean:6.3f} "
            f"{o.heldout.top1:7.3f} {band:>16} {o.null.top1:6.3f} {o.persistence.top1:7.3f} {o.position.top1:8.3f}"
        )
    for s in result.skipped_offsets:
        rows.append(f"{s['k']:>3} skipped: {s['reason']}")
    return "\n".join(rows)


# --- private -----------------------------------------------------------------------------


def _temporal_cca(hidden, scores, sample_ids, steps, offsets, config: CcaConfig, rng) -> CcaResult:
    hidden = np.asarray(hidden, dtype=np.float64)
    flat = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    sample_ids, steps = np.asarray(sample_ids).astype(str), np.asarray(steps, dtype=np.int64)
    n_samples = np.unique(sample_ids).size
    if n_samples < MIN_SAMPLES:
        raise DataError(f"cca needs at least {MIN_SAMPLES} samples for a held-out split by sample; got {n_samples}")
    train, test = split_by_sample(sample_ids, (config.train_fraction, 1 - config.train_fraction), rng)
    all_rows = np.ones(len(steps), bool)
    position = _one_hot(steps, config.position_bins)
    full = _Views(hidden, flat, position, all_rows, config)
    fit = _Views(hidden, flat, position, train, config)
    out, skipped = [], []
    for k in offsets:
        src, tgt = offset_pairs(sample_ids, steps, k)
        on_train, on_test = train[src], test[src]
        if min(on_train.sum(), on_test.sum()) < MIN_PAIRS:
            skipped.append({"k": int(k), "reason": f"{on_train.sum()} train / {on_test.sum()} test pairs"})
            continue
        prev = _previous(flat, sample_ids, steps, tgt, k)
        out.append(_offset(k, src, tgt, prev, on_train, on_test, full, fit, sample_ids, config, rng))
    if not out:
        raise DataError(f"no offset in {list(offsets)} has {MIN_PAIRS}+ same-sample pairs in train and test; lower --max-offset")
    return CcaResult(
        config, int(n_samples), int(np.unique(sample_ids[train]).size), int(np.unique(sample_ids[test]).size),
        flat.shape[1], int((np.ptp(flat, axis=0) == 0).sum()),
        {"hidden": full.x.shape[1], "scores": full.y.shape[1]}, out, skipped,
    )


class _Views:
    """Preprocessing fit on `rows`: hidden → PCA; scores → min-max + PCA; position one-hot as is."""

    def __init__(self, hidden, scores, position, rows, config: CcaConfig):
        lo, span = scores[rows].min(axis=0), np.ptp(scores[rows], axis=0)
        self._lo, self._span = lo, np.where(span > 0, span, 1.0)  # constant heads: scale 1, stay constant
        self.x = _pca(hidden, rows, config.hidden_variance, "hidden states")
        self._score_pca = _fit_pca(self.minmax(scores[rows]), config.score_variance, "head scores")
        self.y = self._score_pca.transform(self.minmax(scores))
        self.position = position

    def minmax(self, scores):
        return (scores - self._lo) / self._span

    def scores(self, raw):
        return self._score_pca.transform(self.minmax(raw))


def _offset(k, src, tgt, prev, on_train, on_test, full: _Views, fit: _Views, sample_ids, config, rng) -> OffsetCca:
    n_comp = config.n_components
    in_sample = _summary(_fit_cca(full.x[src], full.y[tgt], n_comp)[4])
    y_tr, y_te = fit.y[tgt][on_train], fit.y[tgt][on_test]
    groups = sample_ids[src][on_test]
    stats, canon = {}, {}
    for name, x in (("hidden", fit.x[src]), ("persistence", fit.scores(prev)), ("position", fit.position[src])):
        canon[name], stats[name] = _heldout(x[on_train], y_tr, x[on_test], y_te, n_comp)
    perm_tr, perm_te = rng.permutation(len(y_tr)), rng.permutation(len(y_te))
    null, _ = _heldout(fit.x[src][on_train], y_tr[perm_tr], fit.x[src][on_test], y_te[perm_te], n_comp)
    boot = dict(metric=_corr_from_moments, rng=rng, n_boot=config.n_boot, ci=config.ci)
    return OffsetCca(
        int(k), len(src), int(on_train.sum()), int(on_test.sum()), in_sample, canon["hidden"],
        bootstrap_metric(stats["hidden"], groups, **boot), null, canon["persistence"], canon["position"],
        bootstrap_metric_gap(stats["hidden"], stats["persistence"], groups, **boot),
        bootstrap_metric_gap(stats["hidden"], stats["position"], groups, **boot),
    )


def _heldout(x_tr, y_tr, x_te, y_te, n_comp) -> tuple[Canonical, np.ndarray]:
    """Fit CCA on train pairs; correlations of projected test pairs; moments of the first pair [n_te, 6]."""
    wx, wy, mx, my, _ = _fit_cca(x_tr, y_tr, n_comp)
    u, v = (x_te - mx) @ wx, (y_te - my) @ wy
    corr = [_corr(u[:, i], v[:, i]) for i in range(u.shape[1])]
    a, b = u[:, 0], v[:, 0]
    return _summary(np.array(corr)), np.stack([np.ones_like(a), a, b, a * a, b * b, a * b], axis=1)


def _fit_cca(x, y, n_components):
    """Exact CCA: whiten each side (eigen-decomposition, rank-safe), SVD of the cross-correlation."""
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    ax, ay = _whitener(xc), _whitener(yc)
    u, s, vt = np.linalg.svd((xc @ ax).T @ (yc @ ay) / max(len(x) - 1, 1), full_matrices=False)
    c = max(1, min(n_components, len(s), len(x) - 1))
    return ax @ u[:, :c], ay @ vt.T[:, :c], mx, my, np.clip(s[:c], 0.0, 1.0)


def _whitener(xc):
    """[p, r] map with identity covariance of xc @ map; directions with ~zero variance dropped."""
    cov = xc.T @ xc / max(len(xc) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    keep = evals > max(evals.max(initial=0.0), 0.0) * 1e-10
    if not keep.any():
        return np.zeros((xc.shape[1], 1))
    return evecs[:, keep] / np.sqrt(evals[keep])


def _fit_pca(x, variance, what) -> PCA:
    if not np.ptp(x, axis=0).any():
        raise DataError(f"cca: {what} never vary in the fitting rows; nothing to correlate")
    return PCA(n_components=variance, svd_solver="full").fit(x)


def _pca(x, rows, variance, what):
    return _fit_pca(x[rows], variance, what).transform(x)


def _previous(scores, sample_ids, steps, tgt, k):
    """Raw scores [pairs, heads] of the last set observed before each target (zeros where none)."""
    prev = previous_observed(sample_ids, steps, tgt, k)
    return np.where((prev >= 0)[:, None], scores[np.maximum(prev, 0)], 0.0)


def _one_hot(steps, bins):
    """Step index as one-hot [N, bins]; steps ≥ bins − 1 share the last bin."""
    out = np.zeros((len(steps), bins))
    out[np.arange(len(steps)), np.minimum(steps, bins - 1)] = 1.0
    return out


def _summary(corr) -> Canonical:
    corr = np.nan_to_num(np.asarray(corr, dtype=np.float64))
    return Canonical([float(c) for c in corr], float(corr[0]), float(corr[:10].mean()), float(corr[:50].mean()))


def _corr(a, b) -> float:
    sa, sb = a.std(), b.std()
    return 0.0 if sa == 0 or sb == 0 else float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def _corr_from_moments(m):
    """Pearson correlation from summed [1, a, b, a², b², ab] (any leading axes)."""
    n, a, b, aa, bb, ab = np.moveaxis(m, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ab / n - a * b / n**2) / np.sqrt((aa / n - (a / n) ** 2) * (bb / n - (b / n) ** 2))
