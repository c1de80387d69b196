"""Claim 2 — irreplaceability: per-step ablation grid (Sec. 3.3.1) and progressive ablation (Sec. 3.3.2).

Each sample is prefilled once; every condition forks that prefill through the tracer. At every step
the tracer runs the clean pass, a selector picks heads from it (selectors.py), and the step is
recomputed with those heads masked. Choices where the paper is silent (AblationConfig fields,
reported in the README):
- masking: `zero` (head output removed before the output projection); `uniform` = Wu et al.'s code.
- count matching (`match`, `match_scope`): `average` (default) = the mean number of heads the dynamic
  condition masked per step, pooled over every step of every sample of the run (the paper: "averaged
  over the run"), rounded half up and at least 1 when the dynamic condition masked any head, fixed for
  every step of every baseline; `unmasked` = the same over the unmasked runs' |D_t| (masking D_t
  derails retrieval, after which D_t is empty, so `average` is the smaller count); `step` = |D_t| of
  each step of the baseline's own run. The run-level count needs every sample's dynamic condition
  before any baseline runs, so `match_scope="run"` makes two passes: the first runs `none` and
  `dynamic` on every sample into <out>/first_pass (resumable; the count is computed from what is
  stored there, so a resumed run gets the same count), the second prefills each sample again and runs
  the baselines (one extra prefill per sample). `match_scope="sample"` matches each sample's own mean
  in one pass (one prefill per sample; counts then differ between samples).
- random heads: one permutation per sample (Wu et al. draw per cell), seeded from (seed, sample id).
- static ranking: a separate detection run (never these samples); without one, a detection pass
  on the same grid with seed + 1 (fresh UUID needles), one sample per cell, in <out>/detection.
- compensation: E_t = H'_t minus H_t minus the heads masked at t (a masked head cannot compensate);
  H from the clean pass with its own token, H' from the masked pass with the kept token.
- progressive samples: one per depth, depths evenly spaced over 0–100%.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from dynheads.config import run_config
from dynheads.errors import ConfigError
from dynheads.experiments.dynamism import static_cap_note, top_heads
from dynheads.experiments.static_ranking import load_static_ranking
from dynheads.experiments.stats import bootstrap_ci, paired_difference
from dynheads.experiments.trace import check_prompt_budget, niah_inputs
from dynheads.interventions.methods import ablations
from dynheads.interventions.selectors import build, make_intervention
from dynheads.models import LoadedModel
from dynheads.records import load_sample_records
from dynheads.runs import RunDir, safe_name
from dynheads.scores.copy_paste import copy_paste_active
from dynheads.tasks.base import EncodedSample
from dynheads.tasks.niah import NiahConfig, niah_samples, score_response
from dynheads.tracing.runner import Runner, run_samples
from dynheads.tracing.tracer import Trace, TraceConfig, Tracer

PAPER_FIG2 = ("paper (llama3.1-8b, Fig. 2): masking the dynamic heads drives accuracy to ~0 across the "
              "whole grid; masking as many static or random heads turns only some cells red")
PAPER_FIG3 = ("paper (llama3.1-8b, Fig. 3): accuracy 1.0 -> 0.0 by k = 20; compensated-static "
              "overlap 4.5-7 for k >= 5")
BASELINES = ("static", "static_excluding_dynamic", "random")
CONDITIONS = ("none", "dynamic") + BASELINES
COMPARISONS = (("dynamic", "none"), ("dynamic", "static"), ("dynamic", "random"),
               ("dynamic", "static_excluding_dynamic"))
METRICS = ("accuracy", "rouge_l")
_KEEP = ("token_id", "clean_token_id", "token_logprob", "ablated", "top1_pos", "top1_token",
         "masked_top1_pos", "masked_top1_token")
# How many heads a baseline masks: the per-step counts it is matched to (condition, result field), or
# None = each step's own |D_t|.
MATCH = {"average": ("dynamic", "heads_masked"), "unmasked": ("none", "dynamic"), "step": None}
MATCH_SCOPES = ("run", "sample")
_COUNTED = {"heads_masked": "heads masked", "dynamic": "|D_t|"}  # what a matched per-step count counts


@dataclass(frozen=True)
class AblationConfig:
    """Settings shared by the grid and the progressive ablation (see the module docstring)."""

    method: str = "zero"  # ablation method (paper silent): zero | uniform
    match: str = "average"  # baseline head count: average | unmasked | step (paper: "average"; see above)
    match_scope: str = "run"  # mean over the run (paper; two passes) | sample (each sample's own; one pass)
    random_per_step: bool = False  # random heads: fixed per sample (default) or redrawn each step
    span: str = "needle"  # Eq. 1's I_needle
    static_ranking: str | None = None  # head_score JSON or detection run folder; None = detection pass
    static_top: int = 20  # static set of the compensation metric (paper: top-20)
    exclude_ablated: bool = True  # compensation ignores heads masked at the step (paper: E = H' \ H)
    detection_samples: int = 5  # progressive: samples of the detection pass when no ranking is given
    n_boot: int = 2000  # bootstrap resamples over samples
    seed: int = 0  # NIAH needles, random heads, bootstrap

    def __post_init__(self):
        ablations.get(self.method)
        if self.match not in MATCH:
            raise ConfigError(f"unknown --match '{self.match}'; choose one of: {', '.join(MATCH)}")
        if self.static_top < 1 or self.n_boot < 1:
            raise ConfigError("--static-top and --n-boot must be at least 1")
        if self.match_scope not in MATCH_SCOPES:
            raise ConfigError(f"unknown --match-scope '{self.match_scope}'; choose one of: {', '.join(MATCH_SCOPES)}")

    @property
    def two_pass(self) -> bool:
        """Whether the baseline count needs the whole run's first pass (run-level matching)."""
        return MATCH[self.match] is not None and self.match_scope == "run"


def matched_heads(counts: list[list[int]]) -> int:
    """The baselines' fixed head count from per-step counts (one list per sample).

    Mean over all steps pooled, rounded half up; at least 1 when any step counted a head, so a
    baseline never silently equals the unmasked run while the dynamic condition masked something.
    0 only when no step counted any head.
    """
    steps = [int(c) for sample in counts for c in sample]
    if not any(steps):
        return 0
    return max(1, int(np.floor(np.mean(steps) + 0.5)))


def matching_summary(counts: list[list[int]], config: AblationConfig) -> dict:
    """How the baseline count was matched, for results/ablation.json and the printed table."""
    if MATCH[config.match] is None:
        return {"match": "step", "rule": "each step masks as many heads as its own |D_t|"}
    cond, field_name = MATCH[config.match]
    steps = [c for sample in counts for c in sample]
    mean = float(np.mean(steps)) if steps else 0.0
    scope = "all samples of the run (first pass)" if config.match_scope == "run" else "each sample separately"
    return {"match": config.match, "scope": config.match_scope, "condition": cond, "field": field_name,
            "mean_per_step": mean, "n_steps": len(steps), "n_samples": len(counts),
            "heads": matched_heads(counts) if config.match_scope == "run" else None,
            "rule": f"mean {_COUNTED[field_name]} per step of the '{cond}' condition over {scope}, "
                    "rounded half up, at least 1 where that condition counted any head"}


def first_pass_sample(tracer: Tracer, encoded: EncodedSample, config: AblationConfig) -> tuple[dict, dict]:
    """One prefill, then the conditions none and dynamic (run-level matching's first pass)."""
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    arrays, results = _run_condition(tracer, state, encoded, "none", None, config)
    dyn, dyn_result = _run_condition(tracer, state, encoded, "dynamic", build("dynamic"), config)
    arrays.update(dyn), results.update(dyn_result)
    return arrays, {"conditions": results}


def ablate_sample(tracer: Tracer, encoded: EncodedSample, ranking: np.ndarray, config: AblationConfig,
                  matched: int | None = None, first: tuple[dict, dict] | None = None) -> tuple[dict, dict]:
    """One prefill, then the conditions none, dynamic, static, static-excluding-dynamic, random.

    matched: the run-level baseline count (required when `config.two_pass`); first: this sample's
    `first_pass_sample` output, reused instead of running none and dynamic again.
    """
    if config.two_pass and matched is None:
        raise ValueError("run-level matching needs the count from the run's first pass (matched=...)")
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    rng = sample_rng(config.seed, encoded.sample.id)
    if first is None:
        arrays, results = _run_condition(tracer, state, encoded, "none", None, config)
        dyn, dyn_result = _run_condition(tracer, state, encoded, "dynamic", build("dynamic"), config)
        arrays.update(dyn), results.update(dyn_result)
    else:
        arrays, results = dict(first[0]), dict(first[1]["conditions"])
    n = matched if config.two_pass else _sample_count(results, config)
    for name in BASELINES:
        select = build(name, ranking=ranking, n=n, rng=rng, per_step=config.random_per_step)
        more, more_result = _run_condition(tracer, state, encoded, name, select, config)
        arrays.update(more), results.update(more_result)
    meta = encoded.sample.metadata
    return arrays, {"length": meta["length"], "depth": meta["depth"], "matched_heads": n, "conditions": results}


def progressive_sample(tracer: Tracer, encoded: EncodedSample, ks: tuple[int, ...], static: np.ndarray,
                       config: AblationConfig) -> tuple[dict, dict]:
    """One prefill, then k heads masked per step (progressive selector) for every k."""
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    arrays, results = {}, {}
    for k in ks:
        more, res = _run_condition(tracer, state, encoded, f"k{k}", build("progressive", k=k, span=config.span), config)
        cond = {n[len(f"k{k}__"):]: v for n, v in more.items()}
        res[f"k{k}"]["compensation"] = max_static_compensation(
            compensated_heads(cond, encoded.token_spans, config.span, config.exclude_ablated), static)
        arrays.update(more), results.update(res)
    return arrays, {"length": encoded.sample.metadata["length"], "depth": encoded.sample.metadata["depth"],
                    "conditions": results}


def compensated_heads(arrays: dict[str, np.ndarray], token_spans: dict, span: str = "needle",
                      exclude_ablated: bool = True) -> np.ndarray:
    """E_t = H'_t \\ H_t, bool [T, L, H] (Sec. 3.3.2): heads retrieving only once others are masked.

    H: Eq. 1 on the clean pass with its own token; H': Eq. 1 on the masked pass with the kept token.
    exclude_ablated also removes the heads masked at t (our choice; the paper does not say).
    """
    if not len(arrays["token_id"]):
        return np.zeros((0,) + arrays["ablated"].shape[1:], bool)
    before = copy_paste_active(arrays, token_spans, span=span, generated_key="clean_token_id")
    after = copy_paste_active(arrays, token_spans, span=span, pos_key="masked_top1_pos",
                              token_key="masked_top1_token", generated_key="token_id")
    out = after & ~before
    return out & ~arrays["ablated"] if exclude_ablated else out


def max_static_compensation(compensated: np.ndarray, static: np.ndarray) -> int:
    """m_s = max_t |E_t ∩ static top set| (0 for an empty generation). compensated: bool [T, L, H]."""
    if not len(compensated):
        return 0
    return int((compensated & static).reshape(len(compensated), -1).sum(1).max())


def summarise(per_sample: dict[str, dict[str, np.ndarray]], rng: np.random.Generator, n_boot: int = 2000,
              comparisons=COMPARISONS) -> dict:
    """Per condition: mean and 95% bootstrap CI of each metric; per comparison: paired a − b over samples.

    per_sample: condition -> metric -> [N] (the same N samples, in the same order, for every condition).
    """
    conditions = {c: {m: _describe(m, v, rng, n_boot) for m, v in metrics.items()} for c, metrics in per_sample.items()}
    tests = [{"a": a, "b": b, "metric": m, **asdict(paired_difference(per_sample[a][m], per_sample[b][m], rng, n_boot))}
             for a, b in comparisons if a in per_sample and b in per_sample for m in METRICS]
    return {"conditions": conditions, "comparisons": tests}


def cell_means(lengths: np.ndarray, depths: np.ndarray, values: np.ndarray) -> tuple[list, list, np.ndarray]:
    """Mean of `values` [N] per (depth, length) cell → (lengths, depths, [n_depths, n_lengths])."""
    ls, ds = sorted(set(lengths.tolist())), sorted(set(depths.tolist()))
    grid = np.full((len(ds), len(ls)), np.nan)
    for i, d in enumerate(ds):
        for j, l in enumerate(ls):
            sel = (depths == d) & (lengths == l)
            grid[i, j] = values[sel].mean() if sel.any() else np.nan
    return ls, ds, grid


def run_ablation(lm: LoadedModel, niah: NiahConfig, out: str | Path, config: AblationConfig = AblationConfig(),
                 trace: TraceConfig = TraceConfig(), quiet: bool = False,
                 runner: Runner = run_samples) -> tuple[RunDir, dict]:
    """Per-step ablation grid into `out` (resumable), then results/ablation.json and Fig. 2."""
    from dynheads.report.ablation_figures import ablation_heatmaps

    trace = replace(trace, record_hidden=False, mass_spans=(config.span,))
    niah, inputs = niah_inputs(niah)
    check_prompt_budget(niah.lengths, trace.max_new_tokens, lm.max_positions)
    samples = list(niah_samples(lm.tokenizer, niah, lm.max_positions))
    detection = replace(niah, samples_per_cell=1, seed=niah.seed + 1)
    load_ranking = partial(load_static_ranking, config.static_ranking, lm, niah, {e.sample.id for e in samples},
                           detection, Path(out) / "detection", trace, quiet, runner)
    given = load_ranking() if config.static_ranking else None  # checked before the run folder exists
    run = RunDir.create(out, run_config("ablation", lm, niah.seed, task=niah, trace=trace, ablation=config,
                                        inputs=inputs))
    ranking, source = given or load_ranking()  # default: a detection pass inside the run folder
    matching = ablate_samples(run, Tracer(lm, trace), samples, ranking, config, quiet, runner)
    rows = run.sample_results()
    per_sample = {c: _metric_arrays(rows, c) for c in CONDITIONS}
    result = summarise(per_sample, sample_rng(config.seed, "ablation-stats"), config.n_boot)
    lengths, depths = np.array([r["length"] for r in rows]), np.array([float(r["depth"]) for r in rows])
    grids = {c: cell_means(lengths, depths, per_sample[c]["accuracy"]) for c in CONDITIONS}
    result.update(n_samples=len(rows), static_ranking=source, paper=PAPER_FIG2, matching=matching,
                  matched_heads_mean=None if config.match == "step"
                  else float(np.mean([r["matched_heads"] for r in rows])),
                  cells={"lengths": grids["none"][0], "depths": grids["none"][1],
                         "accuracy": {c: _nan_to_none(g[2]) for c, g in grids.items()}})
    run.write_result("ablation", result)
    overlap = {c: result["conditions"][c]["overlap_per_step"] for c in CONDITIONS}
    _save_figure(ablation_heatmaps(grids["none"][0], grids["none"][1], {c: grids[c][2] for c in CONDITIONS},
                                   overlap, result["conditions"]["dynamic"]["dynamic_per_step"],
                                   title=f"{lm.source}: NIAH accuracy with heads masked per step ({config.method})"),
                 run.figure_path("ablation_heatmaps"))
    return run, result


def ablate_samples(run: RunDir, tracer: Tracer, samples: list[EncodedSample], ranking: np.ndarray,
                   config: AblationConfig, quiet: bool = False, runner: Runner = run_samples) -> dict:
    """Every condition of every sample into `run` (resumable); returns `matching_summary`.

    Run-level matching first runs none and dynamic on every sample into <run>/first_pass, then derives
    the count from what is stored there (so a resumed run uses the same count) and runs the baselines.
    """
    if not config.two_pass:
        runner(run, samples, lambda enc: ablate_sample(tracer, enc, ranking, config), len(samples), quiet)
        return matching_summary([_match_counts(r["conditions"], config) for r in run.sample_results()]
                                if MATCH[config.match] else [], config)
    first = RunDir.create(run.path / "first_pass", {**run.config, "kind": "ablation-first-pass"})
    runner(first, samples, lambda enc: first_pass_sample(tracer, enc, config), len(samples), quiet)
    stored = {r["id"]: r for r in first.sample_results()}
    matching = matching_summary([_match_counts(stored[e.sample.id]["conditions"], config) for e in samples], config)

    def work(enc: EncodedSample) -> tuple[dict, dict]:
        arrays = load_sample_records(first.path / "records" / f"{safe_name(enc.sample.id)}.npz")
        return ablate_sample(tracer, enc, ranking, config, matching["heads"], (arrays, stored[enc.sample.id]))

    runner(run, samples, work, len(samples), quiet)
    return matching


def run_progressive(lm: LoadedModel, niah: NiahConfig, ks: tuple[int, ...], out: str | Path,
                    config: AblationConfig = AblationConfig(), trace: TraceConfig = TraceConfig(),
                    quiet: bool = False, runner: Runner = run_samples) -> tuple[RunDir, dict]:
    """Progressive ablation (k heads per step for every k) into `out`, then results and Fig. 3."""
    from dynheads.report.ablation_figures import progressive_curve

    check_ks(ks, lm.layout.n_total)
    trace = replace(trace, record_hidden=False, mass_spans=(config.span,), row_spans=(config.span,))
    niah, inputs = niah_inputs(niah)
    check_prompt_budget(niah.lengths, trace.max_new_tokens, lm.max_positions)
    samples = list(niah_samples(lm.tokenizer, niah, lm.max_positions))
    detection = progressive_niah(niah.lengths[0], config.detection_samples, niah.seed + 1, niah.haystack)
    load_ranking = partial(load_static_ranking, config.static_ranking, lm, niah, {e.sample.id for e in samples},
                           detection, Path(out) / "detection", trace, quiet, runner)
    given = load_ranking() if config.static_ranking else None  # checked before the run folder exists
    run = RunDir.create(out, run_config("ablation-progressive", lm, niah.seed, task=niah, trace=trace,
                                        ablation=config, ks=list(ks), inputs=inputs))
    ranking, source = given or load_ranking()  # default: a detection pass inside the run folder
    static = top_heads(ranking, config.static_top)
    tracer = Tracer(lm, trace)
    runner(run, samples, lambda enc: progressive_sample(tracer, enc, ks, static, config), len(samples), quiet)
    rows = run.sample_results()
    per_k = {f"k{k}": _metric_arrays(rows, f"k{k}") for k in ks}
    result = summarise(per_k, sample_rng(config.seed, "progressive-stats"), config.n_boot, comparisons=())
    result.update(ks=list(ks), n_samples=len(rows), static_ranking=source, paper=PAPER_FIG3,
                  static_heads=[lm.layout.label(*divmod(int(i), lm.layout.n_heads)) for i in np.flatnonzero(static)],
                  static_top_requested=config.static_top,
                  static_note=static_cap_note(int(static.sum()), config.static_top))
    run.write_result("ablation_progressive", result)
    conds = result["conditions"]
    _save_figure(progressive_curve(list(ks), [conds[f"k{k}"]["accuracy"] for k in ks],
                                   [conds[f"k{k}"]["compensation"] for k in ks], config.static_top,
                                   title=f"{lm.source}: progressive ablation ({config.method}), {len(rows)} samples"),
                 run.figure_path("ablation_progressive"))
    return run, result


def progressive_niah(length: int, n_samples: int, seed: int, haystack: str | None = None) -> NiahConfig:
    """One sample per depth, depths evenly spaced over 0–100% (the paper only says 20 runs at 5000 tokens)."""
    if n_samples < 1:
        raise ConfigError("--samples must be at least 1")
    depths = tuple(dict.fromkeys(round(float(d), 1) for d in np.linspace(0, 100, n_samples)))
    return NiahConfig(lengths=(length,), depths=depths, samples_per_cell=1, haystack=haystack, seed=seed)


def check_ks(ks: tuple[int, ...], n_heads: int) -> None:
    if not ks:
        raise ConfigError("--ks is empty")
    bad = [k for k in ks if not 0 <= k <= n_heads]
    if bad:
        raise ConfigError(f"k = {bad[0]} is outside 0..{n_heads} (the model has {n_heads} heads)")


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """An RNG seeded from (seed, a stable hash of the sample id or purpose)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


# --- internals -----------------------------------------------------------------------------
def _run_condition(tracer: Tracer, state, encoded: EncodedSample, name: str, select, config: AblationConfig):
    intervention = None if select is None else make_intervention(select, encoded.token_spans, encoded.input_ids,
                                                                 config.span)
    trace = tracer.generate(state, intervention=intervention, ablation=config.method, fork=True)
    arrays, result = _condition_outputs(tracer, trace, encoded, config.span)
    return {f"{name}__{k}": v for k, v in arrays.items()}, {name: result}


def _condition_outputs(tracer: Tracer, trace: Trace, encoded: EncodedSample, span: str) -> tuple[dict, dict]:
    # Trace.arrays() of an intervention trace that stopped at its first step raises KeyError (no clean arrays)
    stacked = trace.arrays() if trace.token_ids else {"token_id": np.zeros(0, np.int64)}
    arrays = {k: v for k, v in stacked.items() if k in _KEEP or k.startswith("mass_")}
    shape = (len(arrays["token_id"]),) + tracer.lm.layout.shape
    arrays.setdefault("ablated", np.zeros(shape, bool))
    if not len(arrays["token_id"]):
        dynamic = np.zeros(shape, bool)
    else:
        key = "clean_token_id" if "clean_token_id" in arrays else "token_id"
        dynamic = copy_paste_active(arrays, encoded.token_spans, span=span, generated_key=key)
    response = tracer.lm.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
    per_step = lambda m: [int(x) for x in m.reshape(len(m), -1).sum(1)] if len(m) else []  # noqa: E731
    return arrays, {"response": response, "n_steps": len(trace.token_ids), **score_response(response, encoded.sample),
                    "heads_masked": per_step(arrays["ablated"]), "dynamic": per_step(dynamic),
                    "overlap": per_step(arrays["ablated"] & dynamic)}


def _match_counts(conditions: dict, config: AblationConfig) -> list[int]:
    """The per-step counts a baseline is matched to, from one sample's none/dynamic results."""
    cond, field_name = MATCH[config.match]
    return list(conditions[cond][field_name])


def _sample_count(results: dict, config: AblationConfig) -> int | None:
    """Per-sample matching (match_scope="sample"), or None for --match step."""
    return matched_heads([_match_counts(results, config)]) if MATCH[config.match] else None


def _nan_to_none(grid: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in grid]


def _describe(metric: str, values: np.ndarray, rng: np.random.Generator, n_boot: int):
    """Answer metrics and compensation get a bootstrap CI; per-step means a plain mean (None if undefined)."""
    if metric in METRICS + ("compensation",):
        return asdict(bootstrap_ci(values, rng, n_boot))
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _metric_arrays(rows: list[dict], cond: str) -> dict[str, np.ndarray]:
    """Per-sample metrics of one condition [N]; per-step lists become their per-sample mean."""
    res = [r["conditions"][cond] for r in rows]
    out = {m: np.array([x[m] for x in res], float) for m in METRICS}
    for name in ("heads_masked", "dynamic", "overlap"):
        out[f"{name}_per_step"] = np.array([np.mean(x[name]) if x[name] else np.nan for x in res])
    if "compensation" in res[0]:
        out["compensation"] = np.array([x["compensation"] for x in res], float)
    return out


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
