"""Claim 2 — irreplaceability: the per-step ablation grid (Sec. 3.3.1); progressive ablation is progressive.py.

Each sample is prefilled once; every condition forks that prefill through the tracer. At every step
the tracer runs the clean pass, the condition's head set picks heads from it (headsets/: `ablate` names in
names.py, the tracer callback in apply.py), and the step is recomputed with those heads masked. D_t is the
run's head score (`--score`, default Eq. 1 copy_paste) on the clean pass. Choices where the paper is
silent (AblationConfig fields, reported in the README):
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

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from dynheads.analyses.ablation import cell_means, metric_arrays, nan_to_none, summarise
from dynheads.analyses.stats import sample_rng
from dynheads.config import run_config
from dynheads.errors import ConfigError
from dynheads.headsets import apply
from dynheads.headsets.base import HeadSet, build
from dynheads.headsets.names import ABLATION
from dynheads.interventions.methods import ablations
from dynheads.models import LoadedModel
from dynheads.records import load_sample_records
from dynheads.runners.detection import load_static_ranking
from dynheads.runners.trace import check_prompt_budget, with_prompt_style
from dynheads.runs import RunDir, safe_name
from dynheads.scores.base import HeadScore, get_score
from dynheads.tasks.base import EncodedSample, get_task
from dynheads.tasks.niah import NiahConfig
from dynheads.tracing.runner import Runner, SampleWorkWithInputs, run_samples
from dynheads.tracing.tracer import Trace, TraceConfig, Tracer

PAPER_FIG2 = ("paper (llama3.1-8b, Fig. 2): masking the dynamic heads drives accuracy to ~0 across the "
              "whole grid; masking as many static or random heads turns only some cells red")
BASELINES = ("static", "static_excluding_dynamic", "random")
CONDITIONS = ("none", "dynamic") + BASELINES
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


def head_score(config: AblationConfig, name: str | None = None) -> HeadScore:
    """The run's head score (`--score`, default the NIAH task's: Eq. 1) bound to the ablation's span: what D_t means."""
    return get_score(name or get_task("niah").score).with_args(span=config.span)


def first_pass_sample(tracer: Tracer, encoded: EncodedSample, config: AblationConfig,
                      score: HeadScore | None = None) -> tuple[dict, dict]:
    """One prefill, then the conditions none and dynamic (run-level matching's first pass)."""
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    arrays, results = run_condition(tracer, state, encoded, "none", None, config, score)
    dyn, dyn_result = run_condition(tracer, state, encoded, "dynamic", condition_heads("dynamic"), config, score)
    arrays.update(dyn), results.update(dyn_result)
    return arrays, {"conditions": results}


def ablate_sample(tracer: Tracer, encoded: EncodedSample, ranking: np.ndarray, config: AblationConfig,
                  matched: int | None = None, first: tuple[dict, dict] | None = None,
                  score: HeadScore | None = None) -> tuple[dict, dict]:
    """One prefill, then the conditions none, dynamic, static, static-excluding-dynamic, random.

    matched: the run-level baseline count (required when `config.two_pass`); first: this sample's
    `first_pass_sample` output, reused instead of running none and dynamic again; score: the run's
    head score (default: `head_score(config)`).
    """
    if config.two_pass and matched is None:
        raise ValueError("run-level matching needs the count from the run's first pass (matched=...)")
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    rng = sample_rng(config.seed, encoded.sample.id)
    if first is None:
        arrays, results = run_condition(tracer, state, encoded, "none", None, config, score)
        dyn, dyn_result = run_condition(tracer, state, encoded, "dynamic", condition_heads("dynamic"), config, score)
        arrays.update(dyn), results.update(dyn_result)
    else:
        arrays, results = dict(first[0]), dict(first[1]["conditions"])
    n = matched if config.two_pass else _sample_count(results, config)
    for name in BASELINES:
        heads = condition_heads(name, n, ranking=ranking, per_step=config.random_per_step)
        more, more_result = run_condition(tracer, state, encoded, name, heads, config, score, rng)
        arrays.update(more), results.update(more_result)
    meta = encoded.sample.metadata
    return arrays, {"length": meta["length"], "depth": meta["depth"], "matched_heads": n, "conditions": results}


def condition_heads(name: str, k: int | None = None, **available) -> HeadSet:
    """The head set of an `ablate` condition (headsets/names.py), masking k query heads per step (None: |D_t|)."""
    return build(ABLATION.get(name), k=k, **available)


def score_part(score: str | None, span: str) -> dict:
    """The run config's `score` entry: only for a score other than the task's (older run folders resume)."""
    default = get_task("niah").score
    return {} if (score or default) == default else {"score": {"name": score, "args": {"span": span}}}


def run_ablation(lm: LoadedModel, niah: NiahConfig, out: str | Path, config: AblationConfig = AblationConfig(),
                 trace: TraceConfig = TraceConfig(), quiet: bool = False,
                 runner: Runner = run_samples, score: str | None = None) -> tuple[RunDir, dict]:
    """Per-step ablation grid into `out` (resumable), then results/ablation.json and Fig. 2.

    score: the head score that defines D_t (and the detection pass's ranking); default Eq. 1 copy_paste.
    """
    from dynheads.report.ablation_figures import ablation_heatmaps

    scorer = head_score(config, score)
    trace = replace(trace, record_hidden=False, mass_spans=(config.span,))
    niah, trace = with_prompt_style(lm, niah, trace)
    task = get_task("niah")
    niah, inputs = task.inputs(niah)
    check_prompt_budget(niah.lengths, trace.max_new_tokens, lm.max_positions)
    samples = list(task.samples(lm.tokenizer, niah, lm.max_positions))
    detection = replace(niah, samples_per_cell=1, seed=niah.seed + 1)
    load_ranking = partial(load_static_ranking, config.static_ranking, lm, niah, {e.sample.id for e in samples},
                           detection, Path(out) / "detection", trace, quiet, runner, score)
    given = load_ranking() if config.static_ranking else None  # checked before the run folder exists
    run = RunDir.create(out, run_config("ablation", lm, niah.seed, task=niah, trace=trace, ablation=config,
                                        inputs=inputs, **score_part(score, config.span)))
    ranking, source = given or load_ranking()  # default: a detection pass inside the run folder
    matching = ablate_samples(run, Tracer(lm, trace), samples, ranking, config, quiet, runner, scorer)
    rows = run.sample_results()
    per_sample = {c: metric_arrays(rows, c) for c in CONDITIONS}
    result = summarise(per_sample, sample_rng(config.seed, "ablation-stats"), config.n_boot)
    lengths, depths = np.array([r["length"] for r in rows]), np.array([float(r["depth"]) for r in rows])
    grids = {c: cell_means(lengths, depths, per_sample[c]["accuracy"]) for c in CONDITIONS}
    result.update(n_samples=len(rows), static_ranking=source, paper=PAPER_FIG2, matching=matching,
                  matched_heads_mean=None if config.match == "step"
                  else float(np.mean([r["matched_heads"] for r in rows])),
                  cells={"lengths": grids["none"][0], "depths": grids["none"][1],
                         "accuracy": {c: nan_to_none(g[2]) for c, g in grids.items()}})
    run.write_result("ablation", result)
    overlap = {c: result["conditions"][c]["overlap_per_step"] for c in CONDITIONS}
    save_figure(ablation_heatmaps(grids["none"][0], grids["none"][1], {c: grids[c][2] for c in CONDITIONS},
                                   overlap, result["conditions"]["dynamic"]["dynamic_per_step"],
                                   title=f"{lm.source}: NIAH accuracy with heads masked per step ({config.method})"),
                 run.figure_path("ablation_heatmaps"))
    return run, result


def ablate_samples(run: RunDir, tracer: Tracer, samples: list[EncodedSample], ranking: np.ndarray,
                   config: AblationConfig, quiet: bool = False, runner: Runner = run_samples,
                   score: HeadScore | None = None) -> dict:
    """Every condition of every sample into `run` (resumable); returns `matching_summary`.

    Run-level matching first runs none and dynamic on every sample into <run>/first_pass, then derives
    the count from what is stored there (so a resumed run uses the same count) and runs the baselines;
    each sample's first pass is read here and handed to its second pass (on Ray: shipped to the actor).
    """
    if not config.two_pass:
        runner(run, samples, lambda enc: ablate_sample(tracer, enc, ranking, config, score=score), len(samples),
               quiet)
        return matching_summary([_match_counts(r["conditions"], config) for r in run.sample_results()]
                                if MATCH[config.match] else [], config)
    first = RunDir.create(run.path / "first_pass", {**run.config, "kind": "ablation-first-pass"})
    runner(first, samples, lambda enc: first_pass_sample(tracer, enc, config, score), len(samples), quiet)
    stored = {r["id"]: r for r in first.sample_results()}
    matching = matching_summary([_match_counts(stored[e.sample.id]["conditions"], config) for e in samples], config)
    heads = matching["heads"]

    def read_first_pass(enc: EncodedSample) -> tuple[dict, dict]:  # where the run folder is (a Ray driver)
        return load_sample_records(first.path / "records" / f"{safe_name(enc.sample.id)}.npz"), stored[enc.sample.id]

    def second_pass(enc: EncodedSample, first_pass: tuple[dict, dict]) -> tuple[dict, dict]:  # wherever samples run
        return ablate_sample(tracer, enc, ranking, config, heads, first_pass, score)

    runner(run, samples, SampleWorkWithInputs(second_pass, read_first_pass), len(samples), quiet)
    return matching


# --- internals -----------------------------------------------------------------------------
def run_condition(tracer: Tracer, state, encoded: EncodedSample, name: str, heads: HeadSet | None,
                  config: AblationConfig, score: HeadScore | None = None, rng: np.random.Generator | None = None):
    """One condition forked from the sample's prefill: its heads masked at every step (`none` or None: unmasked)."""
    score = score or head_score(config)
    masked = heads is not None and heads.constant is not False
    intervention = (apply.intervention(heads, encoded, tracer.lm.layout, score, config.span, rng) if masked
                    else None)
    trace = tracer.generate(state, intervention=intervention, ablation=config.method, fork=True)
    arrays, result = _condition_outputs(tracer, trace, encoded, score)
    return {f"{name}__{k}": v for k, v in arrays.items()}, {name: result}


def _condition_outputs(tracer: Tracer, trace: Trace, encoded: EncodedSample, score: HeadScore) -> tuple[dict, dict]:
    # Trace.arrays() of an intervention trace that stopped at its first step raises KeyError (no clean arrays)
    stacked = trace.arrays() if trace.token_ids else {"token_id": np.zeros(0, np.int64)}
    arrays = {k: v for k, v in stacked.items() if k in _KEEP or k.startswith("mass_")}
    shape = (len(arrays["token_id"]),) + tracer.lm.layout.shape
    arrays.setdefault("ablated", np.zeros(shape, bool))
    if not len(arrays["token_id"]):
        dynamic = np.zeros(shape, bool)
    else:
        key = "clean_token_id" if "clean_token_id" in arrays else "token_id"  # D_t of the clean pass
        dynamic = score.active(score({**stacked, "token_id": stacked[key]}, encoded.token_spans))
    response = tracer.lm.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
    per_step = lambda m: [int(x) for x in m.reshape(len(m), -1).sum(1)] if len(m) else []  # noqa: E731
    return arrays, {"response": response, "n_steps": len(trace.token_ids), **get_task("niah").metric(response, encoded.sample),
                    "heads_masked": per_step(arrays["ablated"]), "dynamic": per_step(dynamic),
                    "overlap": per_step(arrays["ablated"] & dynamic)}


def _match_counts(conditions: dict, config: AblationConfig) -> list[int]:
    """The per-step counts a baseline is matched to, from one sample's none/dynamic results."""
    cond, field_name = MATCH[config.match]
    return list(conditions[cond][field_name])


def _sample_count(results: dict, config: AblationConfig) -> int | None:
    """Per-sample matching (match_scope="sample"), or None for --match step."""
    return matched_heads([_match_counts(results, config)]) if MATCH[config.match] else None


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
