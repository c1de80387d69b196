"""Which heads drive a Dynamic RAG retrieval (paper Sec. 5, Alg. 2 step 1): the compared strategies.

Every strategy selects `n` heads (paper: 5) at an identification step, from that step's record
(`StepView`: attention rows over the context and the final hidden state):

  dynamic         top-n heads by the Eq. 2 scores a regressor predicts from the step's hidden state
                  (paper: the HotpotQA MLP regressor of Sec. 4.2, trained on a separate run)
  static          top-n heads of a ranking from a separate detection run (same heads every time)
  dynamic-random  n fresh random heads at every retrieval
  fixed-random    n random heads drawn once per question
  none            never retrieves; the context stays hidden (paper: "w/o RAG")
  full            never retrieves; the whole context is visible (our upper bound, not in the paper)

Static and random selection reuse `interventions.selectors` (one implementation per strategy).
A strategy is created once per run; `start(rng)` gives the per-question picker, so a question's
random heads come from the RNG the experiment seeds with (seed, question id, strategy).
"""
from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dynheads.errors import ConfigError
from dynheads.interventions import selectors
from dynheads.registry import Registry
from dynheads.tracing.tracer import StepView

N_HEADS = 5  # paper Sec. 5: every configuration selects 5 heads

Picker = Callable[[StepView], np.ndarray]  # identification step → bool [L, H]


@dataclass(frozen=True)
class HeadStrategy:
    """A named strategy: whether it retrieves, whether the context starts visible, and its picker factory."""

    name: str
    retrieves: bool
    context_visible: bool
    make_picker: Callable[[np.random.Generator], Picker] | None = None

    def start(self, rng: np.random.Generator) -> Picker:
        """The picker for one question (random strategies draw from `rng`)."""
        if self.make_picker is None:
            raise ConfigError(f"strategy '{self.name}' does not select heads")
        return self.make_picker(rng)


strategies: Registry[Callable[..., HeadStrategy]] = Registry("head strategy")


@strategies.register("dynamic")
def dynamic_strategy(regressor: "HeadRegressor | None", shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    if regressor is None:
        raise ConfigError("strategy 'dynamic' needs a regressor (--regressor: a saved .pt or a multihop run folder)")
    if tuple(regressor.shape) != tuple(shape):
        raise ConfigError(f"the regressor predicts {regressor.shape[0]}×{regressor.shape[1]} heads; "
                          f"the model has {shape[0]}×{shape[1]}")

    def make(rng: np.random.Generator) -> Picker:
        def pick(view: StepView) -> np.ndarray:
            if view.hidden is None:
                raise ConfigError("strategy 'dynamic' needs the identification step's hidden state")
            return top_n(regressor.predict(view.hidden), n_heads)
        return pick

    return HeadStrategy("dynamic", True, False, make)


@strategies.register("static")
def static_strategy(ranking: np.ndarray | None, shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    if ranking is None:
        raise ConfigError("strategy 'static' needs a ranking (--static-ranking: head_scores JSON or a multihop run folder)")
    if tuple(np.shape(ranking)) != tuple(shape):
        raise ConfigError(f"the static ranking has shape {np.shape(ranking)}; the model has {shape}")
    select = selectors.build("static", ranking=np.asarray(ranking, float), n=n_heads)
    return HeadStrategy("static", True, False, lambda rng: _via_selector(select, shape))


@strategies.register("dynamic-random")
def dynamic_random_strategy(shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    return HeadStrategy("dynamic-random", True, False, lambda rng: _via_selector(
        selectors.build("random", rng=rng, n=n_heads, per_step=True), shape))


@strategies.register("fixed-random")
def fixed_random_strategy(shape: tuple[int, int], n_heads: int = N_HEADS) -> HeadStrategy:
    return HeadStrategy("fixed-random", True, False, lambda rng: _via_selector(
        selectors.build("random", rng=rng, n=n_heads, per_step=False), shape))


@strategies.register("none")
def no_context_strategy() -> HeadStrategy:
    return HeadStrategy("none", False, False)


@strategies.register("full")
def full_context_strategy() -> HeadStrategy:
    return HeadStrategy("full", False, True)


def build_strategy(name: str, **available: Any) -> HeadStrategy:
    """Create a registered strategy, passing only the arguments its factory declares."""
    factory = strategies.get(name)
    params = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in available.items() if k in params})


def top_n(score: np.ndarray, n: int) -> np.ndarray:
    """bool mask of the n highest scores (ties by flat index), same shape as `score`."""
    flat = np.asarray(score, float).reshape(-1)
    mask = np.zeros(flat.size, bool)
    mask[np.lexsort((np.arange(flat.size), -flat))[:n]] = True
    return mask.reshape(np.shape(score))


# --- the regressor behind `dynamic` --------------------------------------------------------------

@dataclass
class HeadRegressor:
    """Final hidden state [d] → predicted Eq. 2 score of every head [L, H] (paper Sec. 4.2, Table 3).

    Wraps the probe module's MLP (`experiments.probes.build_mlp`) with the input standardisation it
    was trained with. `meta` records the training run and the ids of its samples.
    """

    model: torch.nn.Module
    mean: np.ndarray  # [d]
    scale: np.ndarray  # [d]
    shape: tuple[int, int]
    config: dict[str, Any]  # build_mlp arguments: d_in, sizes, d_out, dropout, activation
    meta: dict[str, Any]

    def predict(self, hidden: np.ndarray) -> np.ndarray:
        x = (np.asarray(hidden, np.float32).reshape(-1, self.mean.size) - self.mean) / self.scale
        self.model.eval()
        with torch.no_grad():
            out = self.model(torch.from_numpy(x.astype(np.float32))).numpy()
        return out.reshape((-1, *self.shape)) if np.ndim(hidden) == 2 else out.reshape(self.shape)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"state_dict": self.model.state_dict(), "mean": self.mean, "scale": self.scale,
                    "shape": list(self.shape), "config": self.config, "meta": self.meta}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadRegressor":
        from dynheads.experiments.probes import build_mlp

        try:
            blob = torch.load(Path(path), map_location="cpu", weights_only=False)
            cfg = blob["config"]
            model = build_mlp(cfg["d_in"], tuple(cfg["sizes"]), cfg["d_out"], cfg["dropout"], cfg["activation"])
            model.load_state_dict(blob["state_dict"])
        except (OSError, KeyError, RuntimeError, TypeError, ValueError, EOFError, AttributeError,
                pickle.UnpicklingError) as e:
            raise ConfigError(f"{path}: not a dynheads regressor ({type(e).__name__})") from None
        return cls(model.eval(), np.asarray(blob["mean"], np.float32), np.asarray(blob["scale"], np.float32),
                   tuple(blob["shape"]), cfg, blob.get("meta", {}))


def _via_selector(select: selectors.Selector, shape: tuple[int, int]) -> Picker:
    """Adapt an ablation selector (which reads a StepContext) to an identification step."""
    empty = np.zeros(shape, bool)
    return lambda view: np.asarray(select(selectors.StepContext(view, empty, np.zeros(0, np.int64))), bool)


def fit_regressor(hidden: np.ndarray, scores: np.ndarray, sample_ids: np.ndarray, rng: np.random.Generator,
                  meta: dict[str, Any] | None = None, config=None) -> HeadRegressor:
    """Train the Table 3 regressor: hidden [N, d] → Eq. 2 scores [N, L, H] (MSE; App. A.5 settings).

    Uses `experiments.probes` (its MLP and `ProbeConfig(regress=True)` defaults: hidden layers (2d, d, d),
    dropout 0.1, Adam 3e-4, batch 128, gradient clip 1.0, early stopping on a validation split by sample).
    The probe module evaluates the regressor; this keeps the fitted model so Dynamic RAG can apply it.
    """
    from dynheads.experiments.probes import ProbeConfig

    cfg = config or ProbeConfig(regress=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(cfg.threads, 1))  # ProbeConfig.threads (1): small matrices, shared cores
    try:
        return _fit(hidden, scores, sample_ids, rng, meta or {}, cfg)
    finally:
        torch.set_num_threads(old_threads)


def _fit(hidden, scores, sample_ids, rng, meta, cfg) -> HeadRegressor:
    import copy

    from dynheads.experiments.probes import build_mlp
    from dynheads.experiments.stats import split_by_sample

    x = np.asarray(hidden, np.float32)
    y = np.asarray(scores, np.float32).reshape(len(x), -1)
    train, val = split_by_sample(np.asarray(sample_ids).astype(str), (0.9, 0.1), rng)
    mean, sd = x[train].mean(0), x[train].std(0)
    scale = np.where(sd > 1e-6, sd, 1.0).astype(np.float32)
    x = (x - mean) / scale
    d = x.shape[1]
    arch = {"d_in": d, "sizes": list(cfg.hidden_sizes or (2 * d, d, d)), "d_out": y.shape[1],
            "dropout": cfg.dropout, "activation": cfg.activation}
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    xv, yv = torch.from_numpy(x[val]), torch.from_numpy(y[val])
    seed = int(rng.integers(2**31))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_mlp(d, tuple(arch["sizes"]), y.shape[1], cfg.dropout, cfg.activation)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        order = torch.Generator().manual_seed(seed)
        best, best_state, waited = float("inf"), copy.deepcopy(model.state_dict()), 0
        for _ in range(cfg.max_epochs):
            model.train()
            for idx in torch.randperm(len(xt), generator=order).split(cfg.batch_size):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(xt[idx]), yt[idx]).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            model.eval()
            with torch.no_grad():
                loss = float(torch.nn.functional.mse_loss(model(xv), yv))
            if loss < best - 1e-7:
                best, best_state, waited = loss, copy.deepcopy(model.state_dict()), 0
            elif (waited := waited + 1) >= cfg.patience:
                break
        model.load_state_dict(best_state)
    shape = tuple(np.shape(scores)[1:])
    info = {**meta, "n_train_steps": int(train.sum()), "n_val_steps": int(val.sum()), "val_mse": best}
    return HeadRegressor(model.eval(), mean.astype(np.float32), scale, shape, arch, info)
