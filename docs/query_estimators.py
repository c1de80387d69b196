"""How well does each in-step estimate of a head's far pull pick out the heads that retrieve (D_t)?

usage: python docs/query_estimators.py DETECTION_RUN [--samples N] [--model default]
Decodes the run's own prompts again with every head open (plain generation: the run's tokens, checked) and,
at every step and layer, computes each KV head's pull (largest far logit minus the log-mass of its S sink and
W recent keys; tracing/page_bounds.py) four ways: Quest's page bound alone (`bound`), the exact logits of the
keys of the r pages with the highest bound (`refined r`, r = 1, 2, 4), and the exact far maximum (`exact`,
which reads the whole cache). The labels are the run's D_t units (its registered score, a KV head active when
any of its query heads is). Printed per estimator: the ROC AUC pooled over all units, the mean AUC *within*
each unit across its steps (what the step itself adds to the unit's identity), and, with the unit's base rate
from the first half of the samples added in a logistic fit (the `query` policy's scorer), held-out AUC and the
share of D_t among the top k units per step on the second half; the base rate alone is the last row.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from dynheads.models import load_model
from dynheads.runners.sparse import _matching_steps, detection_pass
from dynheads.runs import RunDir
from dynheads.scores.base import get_score
from dynheads.tracing.page_bounds import PageSummaries, far_pull
from dynheads.tracing.sparse import Sparsity
from dynheads.tracing.tracer import TraceConfig, Tracer

ESTIMATORS = {"bound": 0, "refined 1": 1, "refined 2": 2, "refined 4": 4, "exact": 10**9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = RunDir.open(args.run, what="detection run")
    lm = load_model(args.model)
    tracer = Tracer(lm, TraceConfig(record_rows=False))
    sparsity, layout = Sparsity(), lm.layout
    groups = layout.group_size
    pulls: dict[str, dict[str, list]] = {}

    def notes(row):
        summaries, mine = PageSummaries(16), pulls.setdefault(row["id"], {name: [] for name in ESTIMATORS})

        def note(t, layer, seen):
            pages = summaries.update(layer, seen.key)
            for name, refine in ESTIMATORS.items():
                steps = mine[name]
                while len(steps) <= t:
                    steps.append(np.full((layout.n_layers, layout.n_kv_heads), -np.inf))
                pull = far_pull(seen.query, seen.key, pages, sparsity.sink, sparsity.recent, seen.scale,
                                seen.visible_from, refine)[0].numpy()
                steps[t][layer] = pull.reshape(-1, groups).max(-1)
        return note

    rows = sorted(run.sample_results(), key=lambda r: r["id"])[:args.samples]
    tokens = detection_pass(tracer, rows, sparsity, notes)
    records = run.read_records()
    score = get_score(run.config["score"]["name"]).with_args(**run.config["score"].get("args", {}))
    active = score.active(records.array("score"))
    x = {name: [] for name in ESTIMATORS}
    y, sample_of = [], []
    for i, row in enumerate(rows):
        mine, same = _matching_steps(records, row["id"], tokens[row["id"]])
        for name in ESTIMATORS:
            x[name] += pulls[row["id"]][name][:same]
        y.append(active[mine][:same].reshape(same, layout.n_layers, -1, groups).any(-1))
        sample_of += [i] * same
    y, sample_of = np.concatenate(y).reshape(-1, layout.n_layers * layout.n_kv_heads), np.asarray(sample_of)
    train = sample_of < len(rows) // 2
    rate = (y[train].sum(0) + 0.5) / (train.sum() + 1)
    prior = np.broadcast_to(np.log(rate / (1 - rate)), y.shape)
    print(f"{len(rows)} samples, {len(y)} steps, D_t: {y.mean():.3f} of units; fits on the first "
          f"{len(rows) // 2} samples, scored on the rest")
    print("| estimator | pooled AUC | within-unit AUC | with base rate: held-out AUC | D_t in top 8 / 16 per step |")
    print("|---|---|---|---|---|")
    for name in ESTIMATORS:
        pull = np.stack(x[name]).reshape(len(y), -1)
        pull = np.where(np.isfinite(pull), pull, np.nanmin(np.where(np.isfinite(pull), pull, np.nan)) - 1)
        units = [u for u in range(y.shape[1]) if 0 < y[:, u].sum() < len(y)]
        within = np.mean([roc_auc_score(y[:, u], pull[:, u]) for u in units])
        mean = pull[train].mean(0)
        feats = np.stack([prior, pull, pull - mean], -1)
        fit = LogisticRegression(max_iter=1000).fit(feats[train].reshape(-1, 3), y[train].reshape(-1))
        held = fit.decision_function(feats[~train].reshape(-1, 3)).reshape(-1, y.shape[1])
        print(f"| {name} | {roc_auc_score(y.reshape(-1), pull.reshape(-1)):.3f} | {within:.3f} "
              f"(over {len(units)} units) | {roc_auc_score(y[~train].reshape(-1), held.reshape(-1)):.3f} | "
              f"{_top(held, y[~train], 8):.3f} / {_top(held, y[~train], 16):.3f} |")
    base = prior[~train]
    print(f"| base rate alone | — | — | {roc_auc_score(y[~train].reshape(-1), base.reshape(-1)):.3f} | "
          f"{_top(base, y[~train], 8):.3f} / {_top(base, y[~train], 16):.3f} |")


def _top(score: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of all D_t units that are among each step's k highest scores (ties by unit index)."""
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(y, order, 1).sum() / max(y.sum(), 1))


if __name__ == "__main__":
    main()
