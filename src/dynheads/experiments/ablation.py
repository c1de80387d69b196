"""Claim 2 — irreplaceability: the per-step ablation grid (Sec. 3.3.1); progressive ablation is progressive.py.

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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from dynheads.config import run_config
from dynheads.errors import ConfigError
from dynheads.experiments.static_ranking import load_static_ranking
from dynheads.experiments.stats import bootstrap_ci, paired_difference, sample_rng
from dynheads.experiments.trace import check_prompt_budget, niah_inputs, with_prompt_style
from dynheads.interventions.methods import ablations
from dynheads.interventions.selectors import build, make_intervention
from dynheads.models import LoadedModel
from dynheads.records import load_sample_records
from dynheads.runs import RunDir, safe_name
from dynheads.scores.copy_paste import copy_paste_active
from dynheads.tasks.base import EncodedSample
from dynheads.tasks.niah import NiahConfig, niah_samples, score_response
from dynheads.tracing.runner import Runner, SampleWorkWithInputs, run_samples
from dynheads.tracing.tracer import Trace, TraceConfig, Tracer

PAPER_FIG2 = ("paper (llama3.1-8b, Fig. 2): masking the dynamic heads drives accuracy to ~0 across the "
              "whole grid; masking as many static or random heads turns only some cells red")
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
    """Settings shared by the grid and the progressive ablation (progressive.py; see both docstrings)."""

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
    arrays, results = run_condition(tracer, state, encoded, "none", None, config)
    dyn, dyn_result = run_condition(tracer, state, encoded, "dynamic", build("dynamic"), config)
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
        arrays, results = run_condition(tracer, state, encoded, "none", None, config)
        dyn, dyn_result = run_condition(tracer, state, encoded, "dynamic", build("dynamic"), config)
        arrays.update(dyn), results.update(dyn_result)
    else:
        arrays, results = dict(first[0]), dict(first[1]["conditions"])
    n = matched if config.two_pass else _sample_count(results, config)
    for name in BASELINES:
        select = build(name, ranking=ranking, n=n, rng=rng, per_step=config.random_per_step)
        more, more_result = run_condition(tracer, state, encoded, name, select, config)
        arrays.update(more), results.update(more_result)
    meta = encoded.sample.metadata
    return arrays, {"length": meta["length"], "depth": meta["depth"], "matched_heads": n, "conditions": results}


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
    niah, trace = with_prompt_style(lm, niah, trace)
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
    per_sample = {c: metric_arrays(rows, c) for c in CONDITIONS}
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
    save_figure(ablation_heatmaps(grids["none"][0], grids["none"][1], {c: grids[c][2] for c in CONDITIONS},
                                   overlap, result["conditions"]["dynamic"]["dynamic_per_step"],
                                   title=f"{lm.source}: NIAH accuracy with heads masked per step ({config.method})"),
                 run.figure_path("ablation_heatmaps"))
    return run, result


def ablate_samples(run: RunDir, tracer: Tracer, samples: list[EncodedSample], ranking: np.ndarray,
                   config: AblationConfig, quiet: bool = False, runner: Runner = run_samples) -> dict:
    """Every condition of every sample into `run` (resumable); returns `matching_summary`.

    Run-level matching first runs none and dynamic on every sample into <run>/first_pass, then derives
    the count from what is stored there (so a resumed run uses the same count) and runs the baselines;
    each sample's first pass is read here and handed to its second pass (on Ray: shipped to the actor).
    """
    if not config.two_pass:
        runner(run, samples, lambda enc: ablate_sample(tracer, enc, ranking, config), len(samples), quiet)
        return matching_summary([_match_counts(r["conditions"], config) for r in run.sample_results()]
                                if MATCH[config.match] else [], config)
    first = RunDir.create(run.path / "first_pass", {**run.config, "kind": "ablation-first-pass"})
    runner(first, samples, lambda enc: first_pass_sample(tracer, enc, config), len(samples), quiet)
    stored = {r["id"]: r for r in first.sample_results()}
    matching = matching_summary([_match_counts(stored[e.sample.id]["conditions"], config) for e in samples], config)
    heads = matching["heads"]

    def read_first_pass(enc: EncodedSample) -> tuple[dict, dict]:  # where the run folder is (a Ray driver)
        return load_sample_records(first.path / "records" / f"{safe_name(enc.sample.id)}.npz"), stored[enc.sample.id]

    def second_pass(enc: EncodedSample, first_pass: tuple[dict, dict]) -> tuple[dict, dict]:  # wherever samples run
        return ablate_sample(tracer, enc, ranking, config, heads, first_pass)

    runner(run, samples, SampleWorkWithInputs(second_pass, read_first_pass), len(samples), quiet)
    return matching


# --- internals -----------------------------------------------------------------------------
def run_condition(tracer: Tracer, state, encoded: EncodedSample, name: str, select, config: AblationConfig):
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


def metric_arrays(rows: list[dict], cond: str) -> dict[str, np.ndarray]:
    """Per-sample metrics of one condition [N]; per-step lists become their per-sample mean."""
    res = [r["conditions"][cond] for r in rows]
    out = {m: np.array([x[m] for x in res], float) for m in METRICS}
    for name in ("heads_masked", "dynamic", "overlap"):
        out[f"{name}_per_step"] = np.array([np.mean(x[name]) if x[name] else np.nan for x in res])
    if "compensation" in res[0]:
        out["compensation"] = np.array([x["compensation"] for x in res], float)
    return out


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
