"""Claim 3's probe as a reusable object: an MLP from the final hidden state at step n to every head's score at n + k.

App. A.5: 3 hidden layers, dropout 0.1, Adam 3e-4, batch 128, gradient clip 1.0, ReduceLROnPlateau;
Asymmetric Loss on active heads (Table 2) or MSE on continuous Eq. 2 scores (Table 3). `fit_probe`
returns a `Probe` that predicts per-head scores for a hidden state and saves / loads itself (state dict
+ JSON), so the Dynamic RAG regressor and head policies use the same code as the probe table
(probe_table.py, which adds the baselines and the verdict). A head is active where its score exceeds
the run's registered head-score threshold (scores/base.py).
"""
from __future__ import annotations

import copy
import json
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from dynheads.analyses import probe_baselines as base
from dynheads.analyses.stats import offset_pairs, split_by_sample
from dynheads.errors import ConfigError, DataError

PAPER_SIZES = (8192, 4096, 4096)  # App. A.5, for d_model = 4096
_ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}
PROBE_FORMAT = "dynheads-probe/1"  # the JSON beside a saved probe's state dict


RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0)  # fit_ridge_probe's penalties to choose from


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
    active_threshold: float | None = None  # a head is active where score > this; None: the run's registered score
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)  # train/val/test, by sample (paper: unit unstated)
    standardize: bool = True  # z-score inputs with train statistics (paper does not say)
    shuffled_baseline: bool = True  # also train the probe on shuffled labels (classifier and regressor)
    n_boot: int = 2000
    seed: int = 0
    threads: int = 1  # CPU threads (torch and BLAS); 1 avoids oversubscription on shared cores, 0 = library default

    def __post_init__(self):
        if self.offset < 0 or self.max_epochs < 1 or abs(sum(self.split) - 1) > 1e-6 or len(self.split) != 3:
            raise ConfigError("probe needs offset >= 0, max_epochs >= 1 and a 3-way split summing to 1")
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"unknown activation '{self.activation}'; choose one of: {', '.join(_ACTIVATIONS)}")


@dataclass
class Probe:
    """A fitted probe: final hidden state [d] or [N, d] at step n → per-head scores [L, H] or [N, L, H] at n + offset.

    task "classify": probabilities that each head is active (trained on score > label_threshold);
    "regress": the scores themselves. Inputs are z-scored with the training split's mean and scale.
    Saved as a torch state dict (the MLP plus `input_mean` / `input_scale`) and `<path>.json`.
    """

    model: torch.nn.Module
    mean: np.ndarray  # [d]
    scale: np.ndarray  # [d]
    shape: tuple[int, int]  # (layers, heads)
    task: str  # classify | regress
    offset: int  # trained to predict step n + offset from the state at step n
    label_threshold: float | None  # classify: labels are score > this (the run's registered threshold)
    decision_threshold: float | None  # classify: probability threshold maximising validation micro-F1
    arch: dict[str, Any]  # build_mlp arguments: d_in, sizes, d_out, dropout, activation
    meta: dict[str, Any] = field(default_factory=dict)  # training run, sample ids, training log

    def predict(self, hidden: np.ndarray) -> np.ndarray:
        x = (np.asarray(hidden, np.float32).reshape(-1, self.mean.size) - self.mean) / self.scale
        out = _forward(self.model, torch.from_numpy(x.astype(np.float32)))
        out = (torch.sigmoid(out) if self.task == "classify" else out).numpy()
        return out.reshape((-1, *self.shape)) if np.ndim(hidden) == 2 else out.reshape(self.shape)

    def save(self, path: str | Path) -> Path:
        """Write `path` (state dict) and `<path>.json` (shapes, task, offset, thresholds, normalisation, meta)."""
        path = Path(path)
        state = {**self.model.state_dict(), "input_mean": torch.from_numpy(self.mean),
                 "input_scale": torch.from_numpy(self.scale)}
        info = {"format": PROBE_FORMAT, "shape": list(self.shape), "task": self.task, "offset": self.offset,
                "label_threshold": self.label_threshold, "decision_threshold": self.decision_threshold,
                "normalisation": "z-score with the training split's mean and sd (input_mean, input_scale)",
                "arch": self.arch, "meta": self.meta}
        for target, write in ((path, lambda t: torch.save(state, t)),
                              (_info_path(path), lambda t: t.write_text(json.dumps(info, indent=1)))):
            tmp = target.with_name(target.name + ".tmp")
            write(tmp)
            tmp.replace(target)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Probe":
        path = Path(path)
        try:
            info = json.loads(_info_path(path).read_text())
            if info.get("format") != PROBE_FORMAT:
                raise ValueError("format")
            state = torch.load(path, map_location="cpu", weights_only=True)
            mean, scale = state.pop("input_mean").numpy(), state.pop("input_scale").numpy()
            a = info["arch"]
            model = build_mlp(a["d_in"], tuple(a["sizes"]), a["d_out"], a["dropout"], a["activation"])
            model.load_state_dict(state)
        except (OSError, KeyError, RuntimeError, TypeError, ValueError, EOFError, AttributeError,
                json.JSONDecodeError, pickle.UnpicklingError) as e:
            raise ConfigError(f"{path}: not a saved dynheads probe ({type(e).__name__}; it needs {_info_path(path).name} "
                              "beside it)") from None
        return cls(model.eval(), mean.astype(np.float32), scale.astype(np.float32), tuple(info["shape"]),
                   info["task"], info["offset"], info["label_threshold"], info["decision_threshold"], a,
                   info.get("meta", {}))


def fit_probe(hidden: np.ndarray, scores: np.ndarray, sample_ids: np.ndarray, steps: np.ndarray | None = None,
              config: ProbeConfig = ProbeConfig(), rng: np.random.Generator | None = None, linear: bool = False,
              meta: dict[str, Any] | None = None) -> Probe:
    """Fit a probe from hidden [N, d] at step n to scores [N, L, H] at step n + config.offset.

    Pairs stay within a sample (`steps` [N] gives each row's step; None: rows are consecutive steps of
    their sample). Samples are split into train and validation by config.split's first two parts
    (renormalised; the test part is left to `probe_heads`); early stopping on validation. Classification
    (config.regress False) labels a head active where its score > config.active_threshold (required).
    linear: no hidden layers (the linear probe).
    """
    with cpu_threads(config.threads):
        rng = rng if rng is not None else np.random.default_rng(config.seed)
        sample_ids = np.asarray(sample_ids).astype(str)
        steps = _steps(sample_ids) if steps is None else np.asarray(steps, np.int64)
        src, tgt = offset_pairs(sample_ids, steps, config.offset)
        if np.unique(sample_ids[src]).size < 2:
            raise DataError(f"a probe at offset {config.offset} needs at least 2 samples with more than "
                            f"{config.offset} steps (one is held out for validation)")
        train_share = config.split[0] / (config.split[0] + config.split[1])
        tr, va = split_by_sample(sample_ids[src], (train_share, 1 - train_share), rng)
        x = np.asarray(hidden, np.float32)[src]
        mean, scale = standardizer(x[tr], config.standardize, x.shape[1])
        x = (x - mean) / scale
        y = probe_targets(np.asarray(scores, np.float32).reshape(len(scores), -1)[tgt], config)
        sizes = () if linear else layer_sizes(config, x.shape[1])
        model, log = train_probe(x, y, tr, va, sizes, config, int(rng.integers(2**31)))
        decision = None if config.regress else base.best_f1_threshold(y[va] > 0.5, predict_rows(model, x[va], config))
        arch = {"d_in": x.shape[1], "sizes": list(sizes), "d_out": y.shape[1], "dropout": config.dropout,
                "activation": config.activation}
        info = {**(meta or {}), **log, "n_train_pairs": int(tr.sum()), "n_val_pairs": int(va.sum())}
        return Probe(model.eval(), mean, scale, tuple(np.shape(scores)[1:]), "regress" if config.regress else "classify",
                     config.offset, None if config.regress else config.active_threshold, decision, arch, info)


def fit_ridge_probe(x: np.ndarray, y: np.ndarray, sample_ids: np.ndarray, rng: np.random.Generator,
                    alphas: tuple[float, ...] = RIDGE_ALPHAS, meta: dict[str, Any] | None = None) -> Probe:
    """A linear probe x [N, d] → y [N, L, H] fitted in closed form (scikit-learn's Ridge, multi-output).

    Inputs are z-scored; the ridge penalty is chosen among `alphas` by mean squared error on a fifth of the
    samples held out (split by sample, never by step), then refitted on all rows. Unlike a gradient-trained
    probe stopped early, every output's intercept is its mean target exactly and weights only move it where
    the data support it, so outputs are comparable across heads (a probability, for 0/1 targets).
    """
    from sklearn.linear_model import Ridge

    sample_ids = np.asarray(sample_ids).astype(str)
    if np.unique(sample_ids).size < 2:
        raise DataError("a ridge probe needs at least 2 samples (one is held out to choose the penalty)")
    x = np.asarray(x, np.float64)
    target = np.asarray(y, np.float64).reshape(len(y), -1)
    tr, va = split_by_sample(sample_ids, (0.8, 0.2), rng)
    mean, scale = standardizer(x[tr].astype(np.float32), True, x.shape[1])
    z = (x - mean) / scale
    errors = {a: float(((Ridge(alpha=a).fit(z[tr], target[tr]).predict(z[va]) - target[va]) ** 2).mean())
              for a in alphas}
    alpha = min(errors, key=lambda a: (errors[a], -a))  # ties: the stronger penalty
    mean, scale = standardizer(x.astype(np.float32), True, x.shape[1])
    fit = Ridge(alpha=alpha).fit((x - mean) / scale, target)
    model = build_mlp(x.shape[1], (), target.shape[1], 0.0)
    with torch.no_grad():
        model[-1].weight.copy_(torch.from_numpy(np.asarray(fit.coef_, np.float32)))
        model[-1].bias.copy_(torch.from_numpy(np.asarray(fit.intercept_, np.float32)))
    arch = {"d_in": x.shape[1], "sizes": [], "d_out": target.shape[1], "dropout": 0.0, "activation": "relu"}
    info = {**(meta or {}), "fit": "ridge", "alpha": alpha, "validation_mse": errors, "n_rows": len(x)}
    return Probe(model.eval(), mean, scale, tuple(np.shape(y)[1:]), "regress", 0, None, None, arch, info)


def train_probe(x: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, sizes: tuple[int, ...],
                config: ProbeConfig, seed: int) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train build_mlp(sizes) on rows `tr` of x [N, d] → y [N, heads], early stopping on rows `va`.

    Loss: Asymmetric Loss on 0/1 targets, or MSE when config.regress. Adam, ReduceLROnPlateau, gradient
    clipping; best validation weights restored. Init, dropout and batch order come from `seed`.
    """
    loss_fn = _mse if config.regress else _asl(config)
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
    return model.eval(), {"epochs": epochs, "best_val_loss": best}


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


def predict_rows(model, x, config: ProbeConfig) -> np.ndarray:
    """A trained MLP's outputs for rows x [N, d]: probabilities (classify) or scores (regress), [N, heads]."""
    out = _forward(model, torch.from_numpy(np.ascontiguousarray(x)))
    return (out if config.regress else torch.sigmoid(out)).numpy()


def probe_targets(y: np.ndarray, config: ProbeConfig) -> np.ndarray:
    """Regression targets as they are; classification labels: score > the activity threshold, as 0/1."""
    if config.regress:
        return y
    if config.active_threshold is None:
        raise ConfigError("a classification probe needs active_threshold (the run's head-score threshold)")
    return (y > config.active_threshold).astype(np.float32)


def standardizer(x_train: np.ndarray, enabled: bool, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) [d] from the training rows; identity when disabled. Near-constant inputs keep scale 1."""
    if not enabled:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    sd = x_train.std(axis=0)
    return x_train.mean(axis=0).astype(np.float32), np.where(sd > 1e-6, sd, 1.0).astype(np.float32)


def layer_sizes(config: ProbeConfig, d: int) -> tuple[int, ...]:
    """Hidden layer sizes: the paper's (8192, 4096, 4096), the config's, or (2d, d, d)."""
    return PAPER_SIZES if config.paper_sizes else (tuple(config.hidden_sizes) or (2 * d, d, d))


@contextmanager
def cpu_threads(n: int):
    """Use n torch and BLAS threads inside the block (0: leave as is); restore on exit."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(n if n > 0 else None):
            yield
    finally:
        torch.set_num_threads(old)


# --- private -----------------------------------------------------------------------------


def _steps(sample_ids: np.ndarray) -> np.ndarray:
    """Step index of each row within its sample, rows of a sample taken as consecutive steps."""
    out = np.zeros(len(sample_ids), np.int64)
    for sid in np.unique(sample_ids):
        rows = np.flatnonzero(sample_ids == sid)
        out[rows] = np.arange(rows.size)
    return out


def _info_path(path: Path) -> Path:
    """The JSON beside a saved probe: <path>.json (regressor.pt → regressor.pt.json)."""
    return path.with_name(path.name + ".json")


def _forward(model, x, chunk: int = 4096) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else model(x)


def _asl(config: ProbeConfig):
    return lambda logits, y: asymmetric_loss(logits, y, config.gamma_neg, config.gamma_pos, config.asl_clip)


def _mse(pred, y):
    return torch.nn.functional.mse_loss(pred, y)
