"""Tables 2 and 3 (App. A.5): the probe against its baselines on a traced run, with a bootstrap verdict.

The probe itself is `probes.py`; the baselines and metrics are `probe_baselines.py`. Split 70/20/10 by
sample; classification metrics are micro-averaged over heads × steps; every predictor gets its own
validation-chosen threshold; a baseline is beaten only when the 95% bootstrap interval (over test
samples) of the probe's gap lies above zero. The activity threshold is the run's registered score's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dynheads.analyses import probe_baselines as base
from dynheads.analyses.probes import (ProbeConfig, cpu_threads, layer_sizes, predict_rows, probe_targets,
                                         standardizer, train_probe)
from dynheads.analyses.stats import MetricGap, bootstrap_metric_gap, offset_pairs, previous_observed, split_by_sample
from dynheads.errors import ConfigError, DataError
from dynheads.runs import RunDir

MIN_SAMPLES = 10  # a 70/20/10 split by sample leaves at least one test sample
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
    with cpu_threads(config.threads):
        return _probe_heads(hidden, scores, sample_ids, steps, config, rng)


def run(run: RunDir, config: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """Read a run's records; write results/probe_k{k}.json (regressor: probe_regress_k{k}.json).

    The activity threshold is the run's registered head score's unless the config sets one.
    """
    named = config  # the flags as given name the result file (a filled-in threshold is not a flag)
    if config.active_threshold is None:
        config = replace(config, active_threshold=score_threshold(run))
    records = run.read_records()
    result = probe_heads(
        records.hidden(), records.array("score"), records.sample_ids, records.step, config,
        np.random.default_rng(config.seed),
    )
    run.write_result(f"probe_{'regress_' if config.regress else ''}k{config.offset}", result, named,
                     ignore=("offset", "regress", "threads"))  # other flags off their defaults: also a named copy
    return result


def score_threshold(run: RunDir) -> float:
    """The activity threshold of the head score a run was traced with (scores/base.py registry)."""
    from dynheads.scores.base import get_score

    score = run.config.get("score")
    if not isinstance(score, dict) or "name" not in score:
        raise DataError(f"{run.path} names no head score in its config (a traced niah or multihop run has one)")
    return get_score(score["name"]).threshold


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



# --- private -----------------------------------------------------------------------------


def _probe_heads(hidden, scores, sample_ids, steps, config: ProbeConfig, rng) -> ProbeResult:
    if config.active_threshold is None:
        raise ConfigError("the probe needs active_threshold: the run's head-score threshold (probes.run fills it in)")
    flat = np.asarray(scores, dtype=np.float32).reshape(len(scores), -1)
    sample_ids, steps, k = np.asarray(sample_ids).astype(str), np.asarray(steps, dtype=np.int64), config.offset
    src, tgt = offset_pairs(sample_ids, steps, k)
    n_with = np.unique(sample_ids[src]).size
    if n_with < MIN_SAMPLES:
        raise DataError(f"probe at offset {k} needs at least {MIN_SAMPLES} samples with more than {k} steps; got {n_with}")
    parts = split_by_sample(sample_ids[src], config.split, rng)  # train, val, test masks over pairs
    tr, va, te = parts
    x = np.asarray(hidden, dtype=np.float32)[src]
    mean, scale = standardizer(x[tr], config.standardize, x.shape[1])
    x = (x - mean) / scale
    y_raw, prev = flat[tgt], previous_observed(sample_ids, steps, tgt, k)
    y = probe_targets(y_raw, config)
    prev_y = probe_targets(np.where((prev >= 0)[:, None], flat[np.maximum(prev, 0)], 0.0).astype(np.float32), config)
    copy_step = (y_raw > config.active_threshold).any(axis=1)  # the target step copies (some head active)
    d = x.shape[1]
    sizes = layer_sizes(config, d)
    seed = int(rng.integers(2**31))
    preds, training = {}, {}
    preds["probe"], training["probe"] = _fit_predict(x, y, tr, va, sizes, config, seed)
    if config.regress:
        preds["ridge"] = base.ridge(x, y, tr, va)
    else:
        preds["linear probe"], training["linear probe"] = _fit_predict(x, y, tr, va, (), config, seed)
    if config.shuffled_baseline:
        shuffled = y.copy()
        for m in (tr, va):
            shuffled[m] = y[m][rng.permutation(int(m.sum()))]
        preds["shuffled-label probe"], training["shuffled-label probe"] = _fit_predict(
            x, shuffled, tr, va, sizes, config, seed)
    preds["frequency prior"] = base.frequency_prior(y, tr)
    preds["position"] = base.position_rate(steps[tgt], y, tr)
    preds["copy last set"] = prev_y
    preds["copy step"] = base.copy_step_rate(copy_step, y, tr)  # last: earlier rows' bootstrap draws unchanged
    evaluate = base.evaluate_regression if config.regress else base.evaluate_classification
    groups = sample_ids[src][te]
    rows, stats = [], {}
    for name, p in preds.items():
        metrics, threshold, stats[name] = evaluate(y, p, va, te)
        rows.append(PredictorMetrics(name, metrics, threshold))
    metric = base.r2_from_sums if config.regress else base.f1_from_counts
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


def _fit_predict(x, y, tr, va, sizes, config: ProbeConfig, seed: int):
    """train_probe, then predictions (probabilities when classifying) for all rows and the training log."""
    model, log = train_probe(x, y, tr, va, sizes, config, seed)
    return predict_rows(model, x, config), log
