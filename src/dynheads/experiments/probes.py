"""Claim 3: MLP probe from the final hidden state at step n to every head's score at step n + k.

App. A.5 (Table 2: binary heads with Asymmetric Loss; Table 3: regressor of Eq. 2 scores). Additions
the paper lacks, reported in the same table: frequency prior, position, linear probe, shuffled-label
probe and copy-the-last-set baselines, and a verdict per baseline from a bootstrap over test samples.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import average_precision_score, precision_recall_curve, r2_score
from threadpoolctl import threadpool_limits

from dynheads.errors import ConfigError, DataError
from dynheads.experiments.stats import MetricGap, bootstrap_metric_gap, offset_pairs, previous_observed, split_by_sample
from dynheads.runs import RunDir

MIN_SAMPLES = 10  # a 70/20/10 split by sample leaves at least one test sample
PAPER_SIZES = (8192, 4096, 4096)  # App. A.5, for d_model = 4096
PAPER_TABLE2 = {  # F1, precision, recall, AUPRC
    "llama3.1-8b": (0.8349, 0.8344, 0.8353, 0.9173), "llama3.2-3b": (0.8456, 0.8564, 0.8351, 0.9289),
    "qwen3-8b": (0.8566, 0.8780, 0.8362, 0.9339), "llama2-13b": (0.8336, 0.8455, 0.8220, 0.9183),
    "phi4-mini": (0.8038, 0.8219, 0.7865, 0.8862),
}
PAPER_TABLE3 = {  # MSE, MAE, R²
    "llama3.1-8b": (0.0023, 0.0177, 0.8120), "llama3.2-3b": (0.0036, 0.0247, 0.8015),
    "qwen3-8b": (0.0050, 0.0255, 0.7200), "llama2-13b": (0.0009, 0.0121, 0.7669),
    "phi4-mini": (0.0014, 0.0109, 0.7333),
}
_ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}


@dataclass(frozen=True)
class ProbeConfig:
    """Probe settings; App. A.5 values unless the comment says otherwise."""

    offset: int = 0  # predict heads at n + k from h_n (paper: k = 0 only)
    regress: bool = False  # Table 3: regress continuous Eq. 2 scores with MSE instead of ASL on active heads
    paper_sizes: bool = False  # use the paper's hidden layers (8192, 4096, 4096)
    hidden_sizes: tuple[int, ...] = ()  # empty: (2d, d, d), the paper's sizes scaled to d_model
    activation: str = "relu"  # paper does not state the activation
    dropout: float = 0.1
    lr: float = 3e-4  # Adam
    batch_size: int = 128
    max_epochs: int = 100  # paper: 100 epochs; we stop early on validation loss
    patience: int = 5  # early-stopping patience (ours; paper trains all 100 epochs)
    lr_patience: int = 3  # ReduceLROnPlateau on validation loss
    grad_clip: float = 1.0
    gamma_neg: float = 4.0  # Asymmetric Loss (Ridnik et al. 2021) defaults; paper does not state them
    gamma_pos: float = 1.0
    asl_clip: float = 0.05
    active_threshold: float = 0.5  # a head is active where score > this (Eq. 1 scores are 0/1)
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)  # train/val/test, by sample (paper: unit unstated)
    standardize: bool = True  # z-score inputs with train statistics (paper does not say)
    shuffled_baseline: bool = True  # also train the probe on shuffled labels
    n_boot: int = 2000
    seed: int = 0
    threads: int = 1  # CPU threads (torch and BLAS); 1 avoids oversubscription on shared cores, 0 = library default

    def __post_init__(self):
        if self.offset < 0 or self.max_epochs < 1 or abs(sum(self.split) - 1) > 1e-6 or len(self.split) != 3:
            raise ConfigError("probe needs offset >= 0, max_epochs >= 1 and a 3-way split summing to 1")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"unknown activation '{self.activation}'; choose one of: {', '.join(_ACTIVATIONS)}")


@dataclass
class PredictorMetrics:
    """Test metrics of one predictor; classification: f1/precision/recall/auprc, regression: mse/mae/r2."""

    name: str
    metrics: dict[str, float | None]
    threshold: float | None = None  # chosen on validation to maximise micro-F1


@dataclass
class ProbeResult:
    config: ProbeConfig
    offset: int
    task: str  # "classify" (Table 2) or "regress" (Table 3)
    n_samples: dict[str, int]  # train / val / test
    n_pairs: dict[str, int]
    n_heads: int
    d_model: int
    hidden_sizes: list[int]
    training: dict[str, dict[str, float]]  # per trained model: epochs, best validation loss
    test_positive_rate: float | None  # classification: fraction of active (head, step) cells
    predictors: list[PredictorMetrics]  # the probe first
    gap_metric: str  # micro-F1 (classify) or variance-weighted R² (regress): probe − baseline
    gaps: dict[str, MetricGap]
    beats_all_baselines: bool  # every gap's 95% bootstrap CI (over test samples) lies above zero


def probe_heads(
    hidden: np.ndarray, scores: np.ndarray, sample_ids: np.ndarray, steps: np.ndarray,
    config: ProbeConfig, rng: np.random.Generator,
) -> ProbeResult:
    """Train the probe on hidden [N, d] at n → scores [N, L, H] at n + k and compare with baselines.

    App. A.5; split 70/20/10 by sample; classification metrics are micro-averaged over heads × steps.
    """
    with _cpu_threads(config.threads):
        return _probe_heads(hidden, scores, sample_ids, steps, config, rng)


def run(run: RunDir, config: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """Read a run's records; write results/probe_k{k}.json (regressor: probe_regress_k{k}.json)."""
    records = run.read_records()
    result = probe_heads(
        records.hidden(), records.array("score"), records.sample_ids, records.step, config,
        np.random.default_rng(config.seed),
    )
    run.write_result(f"probe_{'regress_' if config.regress else ''}k{config.offset}", result, config,
                     ignore=("offset", "regress", "threads"))  # other flags off their defaults: also a named copy
    return result


def format_probe_table(result: ProbeResult) -> str:
    """The paper's Table 2 (or 3) rows beside ours, with each baseline's gap to the probe."""
    cols = ("mse", "mae", "r2") if result.task == "regress" else ("f1", "precision", "recall", "auprc")
    paper = PAPER_TABLE3 if result.task == "regress" else PAPER_TABLE2
    title = "Table 3 (regressor)" if result.task == "regress" else "Table 2 (active heads; micro over heads x steps)"
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"{title}, offset k={result.offset}, test pairs {result.n_pairs['test']} "
             f"from {result.n_samples['test']} samples",
             f"{'row':<28}" + "".join(f"{c:>10}" for c in cols) + f"   {result.gap_metric} gap probe-row [95% CI]"]
    lines += [f"{'paper ' + m:<28}" + "".join(f"{v:>10.4f}" for v in vals) for m, vals in paper.items()]
    for row in result.predictors:
        gap = result.gaps.get(row.name)
        note = "" if gap is None else (
            f"   {fmt(gap.gap)} [{fmt(gap.low)}, {fmt(gap.high)}] {'beaten' if gap.excludes_zero else 'NOT beaten'}")
        lines.append(f"{'ours ' + row.name:<28}" + "".join(f"{fmt(row.metrics.get(c)):>10}" for c in cols) + note)
    lines.append(f"verdict: probe beats all baselines: {'yes' if result.beats_all_baselines else 'no'}")
    return "\n".join(lines)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric Loss (Ridnik et al. 2021) for multi-label targets [B, heads]; summed over heads, mean over rows."""
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p  # probability shifting discards easy negatives
    pos = targets * (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=eps))
    neg = (1 - targets) * p_neg.pow(gamma_neg) * torch.log((1 - p_neg).clamp(min=eps))
    return -(pos + neg).sum(dim=1).mean()


def build_mlp(d_in: int, sizes: tuple[int, ...], d_out: int, dropout: float, activation: str = "relu") -> torch.nn.Module:
    """Linear → activation → dropout per hidden size, then a linear head (no hidden sizes: a linear probe)."""
    layers, width = [], d_in
    for h in sizes:
        layers += [torch.nn.Linear(width, h), _ACTIVATIONS[activation](), torch.nn.Dropout(dropout)]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, d_out))


# --- private -----------------------------------------------------------------------------


def _probe_heads(hidden, scores, sample_ids, steps, config: ProbeConfig, rng) -> ProbeResult:
    flat = np.asarray(scores, dtype=np.float32).reshape(len(scores), -1)
    sample_ids, steps, k = np.asarray(sample_ids).astype(str), np.asarray(steps, dtype=np.int64), config.offset
    src, tgt = offset_pairs(sample_ids, steps, k)
    n_with = np.unique(sample_ids[src]).size
    if n_with < MIN_SAMPLES:
        raise DataError(f"probe at offset {k} needs at least {MIN_SAMPLES} samples with more than {k} steps; got {n_with}")
    parts = split_by_sample(sample_ids[src], config.split, rng)  # train, val, test masks over pairs
    x = np.asarray(hidden, dtype=np.float32)[src]
    if config.standardize:
        mu, sd = x[parts[0]].mean(axis=0), x[parts[0]].std(axis=0)
        x = (x - mu) / np.where(sd > 1e-6, sd, 1.0)
    y_raw, prev = flat[tgt], previous_observed(sample_ids, steps, tgt, k)
    y = y_raw if config.regress else (y_raw > config.active_threshold).astype(np.float32)
    prev_y = np.where((prev >= 0)[:, None], flat[np.maximum(prev, 0)], 0.0).astype(np.float32)
    if not config.regress:
        prev_y = (prev_y > config.active_threshold).astype(np.float32)
    d = x.shape[1]
    sizes = PAPER_SIZES if config.paper_sizes else (tuple(config.hidden_sizes) or (2 * d, d, d))
    tr, va, te = parts
    seed = int(rng.integers(2**31))
    loss = _mse if config.regress else _asl(config)
    preds, training = {}, {}
    preds["probe"], training["probe"] = _fit_predict(x, y, tr, va, sizes, loss, config, seed)
    if config.regress:
        preds["ridge"] = _ridge(x, y, tr, va)
    else:
        preds["linear probe"], training["linear probe"] = _fit_predict(x, y, tr, va, (), loss, config, seed)
        if config.shuffled_baseline:
            shuffled = y.copy()
            for m in (tr, va):
                shuffled[m] = y[m][rng.permutation(int(m.sum()))]
            preds["shuffled-label probe"], training["shuffled-label probe"] = _fit_predict(
                x, shuffled, tr, va, sizes, loss, config, seed)
    prior = y[tr].mean(axis=0)
    preds["frequency prior"] = np.broadcast_to(prior, y.shape)
    preds["position"] = _position_rate(steps[tgt], y, tr, prior)
    preds["copy last set"] = prev_y
    score = _evaluate_regression if config.regress else _evaluate_classification
    groups = sample_ids[src][te]
    rows, stats = [], {}
    for name, p in preds.items():
        row, stats[name] = score(name, y, p, va, te)
        rows.append(row)
    metric = _r2_from_sums if config.regress else _f1_from_counts
    gaps = {
        name: bootstrap_metric_gap(stats["probe"], stats[name], groups, metric, rng, config.n_boot)
        for name in preds if name != "probe"
    }
    count = lambda m: int(np.unique(sample_ids[src][m]).size)  # noqa: E731
    return ProbeResult(
        config, k, "regress" if config.regress else "classify",
        {"train": count(tr), "val": count(va), "test": count(te)},
        {"train": int(tr.sum()), "val": int(va.sum()), "test": int(te.sum())},
        y.shape[1], d, list(sizes), training, None if config.regress else float(y[te].mean()),
        rows, "variance-weighted R2" if config.regress else "micro-F1", gaps,
        all(g.excludes_zero for g in gaps.values()),
    )


def _fit_predict(x, y, tr, va, sizes, loss_fn, config: ProbeConfig, seed: int):
    """Train on rows `tr` with early stopping on `va`; return predictions for all rows and a training log."""
    xt, yt = torch.from_numpy(np.ascontiguousarray(x[tr])), torch.from_numpy(np.ascontiguousarray(y[tr]))
    xv, yv = torch.from_numpy(np.ascontiguousarray(x[va])), torch.from_numpy(np.ascontiguousarray(y[va]))
    with torch.random.fork_rng(devices=[]):  # init and dropout draw from a scoped, seeded generator
        torch.manual_seed(seed)
        model = build_mlp(x.shape[1], sizes, y.shape[1], config.dropout, config.activation)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=config.lr_patience)
        order = torch.Generator().manual_seed(seed)
        best, best_state, waited, epochs = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
        for epochs in range(1, config.max_epochs + 1):
            model.train()
            for idx in torch.randperm(len(xt), generator=order).split(config.batch_size):
                opt.zero_grad()
                loss_fn(model(xt[idx]), yt[idx]).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
            val = loss_fn(_forward(model, xv), yv).item()
            sched.step(val)
            if val < best - 1e-7:
                best, best_state, waited = val, copy.deepcopy(model.state_dict()), 0
            elif (waited := waited + 1) >= config.patience:
                break
        model.load_state_dict(best_state)
    out = _forward(model, torch.from_numpy(x))
    out = out if config.regress else torch.sigmoid(out)
    return out.numpy(), {"epochs": epochs, "best_val_loss": best}


def _forward(model, x, chunk: int = 4096) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else model(x)


def _asl(config: ProbeConfig):
    return lambda logits, y: asymmetric_loss(logits, y, config.gamma_neg, config.gamma_pos, config.asl_clip)


def _mse(pred, y):
    return torch.nn.functional.mse_loss(pred, y)


def _ridge(x, y, tr, va, alphas=(0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)):
    """Ridge regression; alpha chosen on validation MSE."""
    fits = [Ridge(alpha=a).fit(x[tr], y[tr]) for a in alphas]
    best = min(fits, key=lambda f: float(np.mean((f.predict(x[va]) - y[va]) ** 2)))
    return best.predict(x).astype(np.float32)


def _position_rate(target_step, y, tr, prior):
    """Per-head mean target at each step index, from train; steps unseen in train fall back to the prior."""
    out = np.broadcast_to(prior, y.shape).copy()
    for s in np.unique(target_step[tr]):
        out[target_step == s] = y[tr & (target_step == s)].mean(axis=0)
    return out


def _evaluate_classification(name, y, p, va, te):
    """Threshold maximising micro-F1 on validation, applied to test; per-row [tp, fp, fn] for the bootstrap."""
    yv, pv = y[va].ravel() > 0.5, np.asarray(p[va], dtype=np.float64).ravel()
    threshold = 0.5
    if yv.any():
        prec, rec, thr = precision_recall_curve(yv, pv)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
        threshold = float(thr[int(np.argmax(f1))])
    truth, prob = y[te] > 0.5, np.asarray(p[te], dtype=np.float64)
    pred = prob >= threshold
    counts = np.stack([(pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)], axis=1).astype(float)
    tp, fp, fn = counts.sum(axis=0)
    metrics = {
        "f1": _finite(_f1_from_counts(counts.sum(axis=0))),
        "precision": float(tp / (tp + fp)) if tp + fp else None,
        "recall": float(tp / (tp + fn)) if tp + fn else None,
        "auprc": float(average_precision_score(truth.ravel(), prob.ravel())) if truth.any() else None,
    }
    return PredictorMetrics(name, metrics, threshold), counts


def _evaluate_regression(name, y, p, va, te):
    """MSE, MAE, R² (variance-weighted over heads, and sklearn's uniform average); per-row sums for the bootstrap."""
    truth, pred = y[te].astype(np.float64), np.asarray(p[te], dtype=np.float64)
    err = pred - truth
    stats = np.concatenate([err**2, truth, truth**2, np.ones((len(truth), 1))], axis=1)
    metrics = {
        "mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err))),
        "r2": _finite(_r2_from_sums(stats.sum(axis=0))),
        "r2_uniform": float(r2_score(truth, pred, multioutput="uniform_average")) if len(truth) > 1 else None,
    }
    return PredictorMetrics(name, metrics), stats


def _f1_from_counts(c):
    tp, fp, fn = np.moveaxis(np.asarray(c), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * tp / (2 * tp + fp + fn)


def _r2_from_sums(s):
    """1 − ΣSSE / ΣSST over heads from summed [sse (H), y (H), y² (H), 1]."""
    s = np.asarray(s)
    h = (s.shape[-1] - 1) // 3
    sse, sy, syy, n = s[..., :h], s[..., h:2 * h], s[..., 2 * h:3 * h], s[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - sse.sum(-1) / (syy - sy**2 / n).sum(-1)


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


@contextmanager
def _cpu_threads(n: int):
    """Use n torch and BLAS threads inside the block (0: leave as is); restore on exit."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(n if n > 0 else None):
            yield
    finally:
        torch.set_num_threads(old)
