"""The probe table's baselines and metrics (Tables 2 and 3 of App. A.5, with the controls the paper lacks).

Every predictor gives a score per (pair, head); classification picks its own threshold on validation
(max micro-F1) and is scored on test, micro-averaged over heads × steps; regression reports MSE, MAE
and the variance-weighted R². The per-row statistics feed the bootstrap of the probe's gap (stats.py).

Baselines (all fitted on the training split only):
  frequency prior  each head's mean target
  position         each head's mean target at the target's step index (unseen steps: the prior)
  copy step        knows WHEN the model copies but not WHICH heads (paper.md §4.2): each head's mean
                   target over training pairs whose target step is a copy step, and over those whose
                   target is not, given the oracle bit for the target step. A copy step is a step at
                   which at least one head is active (its score exceeds the run's registered threshold:
                   Eq. 1's dynamic set D_t is non-empty, i.e. some head's top-1 position holds the
                   generated token inside the needle; Eq. 2: some head exceeds 0.1).
  copy last set    the last observed step's targets (persistence)
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import average_precision_score, precision_recall_curve, r2_score


def frequency_prior(y: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """[N, heads]: every row gets the training mean of each head."""
    return np.broadcast_to(y[tr].mean(axis=0), y.shape)


def position_rate(target_step: np.ndarray, y: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Per-head mean target at each step index, from train; steps unseen in train fall back to the prior."""
    out = np.array(frequency_prior(y, tr))
    for s in np.unique(target_step[tr]):
        out[target_step == s] = y[tr & (target_step == s)].mean(axis=0)
    return out


def copy_step_rate(copy_step: np.ndarray, y: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Per-head mean target over training copy steps where the target is one, over the others elsewhere.

    copy_step: bool [N], whether the target step is a copy step (see the module docstring); a kind
    absent from training falls back to the prior.
    """
    out = np.array(frequency_prior(y, tr))
    for kind in (True, False):
        rows = tr & (copy_step == kind)
        if rows.any():
            out[copy_step == kind] = y[rows].mean(axis=0)
    return out


def ridge(x, y, tr, va, alphas=(0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)) -> np.ndarray:
    """Ridge regression (the regressor's linear baseline); alpha chosen on validation MSE."""
    fits = [Ridge(alpha=a).fit(x[tr], y[tr]) for a in alphas]
    best = min(fits, key=lambda f: float(np.mean((f.predict(x[va]) - y[va]) ** 2)))
    return best.predict(x).astype(np.float32)


def best_f1_threshold(truth: np.ndarray, prob: np.ndarray) -> float:
    """Probability threshold maximising micro-F1 of `prob >= threshold` (0.5 when there is no positive)."""
    truth, prob = np.asarray(truth, bool).ravel(), np.asarray(prob, dtype=np.float64).ravel()
    if not truth.any():
        return 0.5
    prec, rec, thr = precision_recall_curve(truth, prob)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
    return float(thr[int(np.argmax(f1))])


def evaluate_classification(y, p, va, te) -> tuple[dict, float, np.ndarray]:
    """(metrics, validation-chosen threshold, per-row [tp, fp, fn] for the bootstrap) on test rows."""
    threshold = best_f1_threshold(y[va] > 0.5, p[va])
    truth, prob = y[te] > 0.5, np.asarray(p[te], dtype=np.float64)
    pred = prob >= threshold
    counts = np.stack([(pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)], axis=1).astype(float)
    tp, fp, fn = counts.sum(axis=0)
    metrics = {
        "f1": _finite(f1_from_counts(counts.sum(axis=0))),
        "precision": float(tp / (tp + fp)) if tp + fp else None,
        "recall": float(tp / (tp + fn)) if tp + fn else None,
        "auprc": float(average_precision_score(truth.ravel(), prob.ravel())) if truth.any() else None,
    }
    return metrics, threshold, counts


def evaluate_regression(y, p, va, te) -> tuple[dict, None, np.ndarray]:
    """(MSE, MAE, R² variance-weighted and sklearn's uniform average; None; per-row sums for the bootstrap)."""
    truth, pred = y[te].astype(np.float64), np.asarray(p[te], dtype=np.float64)
    err = pred - truth
    stats = np.concatenate([err**2, truth, truth**2, np.ones((len(truth), 1))], axis=1)
    metrics = {
        "mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err))),
        "r2": _finite(r2_from_sums(stats.sum(axis=0))),
        "r2_uniform": float(r2_score(truth, pred, multioutput="uniform_average")) if len(truth) > 1 else None,
    }
    return metrics, None, stats


def f1_from_counts(c):
    tp, fp, fn = np.moveaxis(np.asarray(c), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * tp / (2 * tp + fp + fn)


def r2_from_sums(s):
    """1 − ΣSSE / ΣSST over heads from summed [sse (H), y (H), y² (H), 1]."""
    s = np.asarray(s)
    h = (s.shape[-1] - 1) // 3
    sse, sy, syy, n = s[..., :h], s[..., h:2 * h], s[..., 2 * h:3 * h], s[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - sse.sum(-1) / (syy - sy**2 / n).sum(-1)


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
