"""Claim 2 — progressive ablation (Sec. 3.3.2, Fig. 3): k heads masked per step for every k, and compensation.

Each sample is prefilled once and every k forks it (the grid's `run_condition`). Choices where the paper
is silent (README):
- compensation: E_t = H'_t minus H_t minus the heads masked at t (a masked head cannot compensate);
  H from the clean pass with its own token, H' from the masked pass with the kept token;
  m_s = max_t |E_t ∩ static top-20|.
- samples: one per depth, depths evenly spaced over 0–100% (the paper: 20 runs at 5,000 tokens).
- `--score` sets D_t (the heads masked first); the compensation E_t stays Eq. 1 on the masked pass's top-1
  positions, the only per-head quantity the tracer records for it.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from dynheads.analyses.ablation import metric_arrays, summarise
from dynheads.analyses.dynamism import static_cap_note, top_heads
from dynheads.analyses.stats import sample_rng
from dynheads.config import run_config
from dynheads.errors import ConfigError
from dynheads.models import LoadedModel
from dynheads.runners.ablation import AblationConfig, condition_heads, head_score, run_condition, save_figure, score_part
from dynheads.runners.detection import load_static_ranking
from dynheads.runners.trace import check_prompt_budget, with_prompt_style
from dynheads.runs import RunDir
from dynheads.scores.base import HeadScore
from dynheads.scores.copy_paste import copy_paste_active
from dynheads.tasks.base import EncodedSample, get_task
from dynheads.tasks.niah import NiahConfig
from dynheads.tracing.runner import Runner, run_samples
from dynheads.tracing.tracer import TraceConfig, Tracer

PAPER_FIG3 = ("paper (llama3.1-8b, Fig. 3): accuracy 1.0 -> 0.0 by k = 20; compensated-static "
              "overlap 4.5-7 for k >= 5")


def progressive_sample(tracer: Tracer, encoded: EncodedSample, ks: tuple[int, ...], static: np.ndarray,
                       config: AblationConfig, score: HeadScore | None = None) -> tuple[dict, dict]:
    """One prefill, then k heads masked per step (the progressive head set) for every k."""
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    arrays, results = {}, {}
    for k in ks:
        more, res = run_condition(tracer, state, encoded, f"k{k}", condition_heads("progressive", k), config, score)
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


def run_progressive(lm: LoadedModel, niah: NiahConfig, ks: tuple[int, ...], out: str | Path,
                    config: AblationConfig = AblationConfig(), trace: TraceConfig = TraceConfig(),
                    quiet: bool = False, runner: Runner = run_samples, score: str | None = None) -> tuple[RunDir, dict]:
    """Progressive ablation (k heads per step for every k) into `out`, then results and Fig. 3 (score: D_t's)."""
    from dynheads.report.ablation_figures import progressive_curve

    check_ks(ks, lm.layout.n_total)
    trace = replace(trace, record_hidden=False, mass_spans=(config.span,), row_spans=(config.span,))
    niah, trace = with_prompt_style(lm, niah, trace)
    task = get_task("niah")
    niah, inputs = task.inputs(niah)
    check_prompt_budget(niah.lengths, trace.max_new_tokens, lm.max_positions)
    samples = list(task.samples(lm.tokenizer, niah, lm.max_positions))
    detection = progressive_niah(niah.lengths[0], config.detection_samples, niah.seed + 1, niah.haystack,
                                 niah.prompt_style)
    load_ranking = partial(load_static_ranking, config.static_ranking, lm, niah, {e.sample.id for e in samples},
                           detection, Path(out) / "detection", trace, quiet, runner, score)
    given = load_ranking() if config.static_ranking else None  # checked before the run folder exists
    run = RunDir.create(out, run_config("ablation-progressive", lm, niah.seed, task=niah, trace=trace,
                                        ablation=config, ks=list(ks), inputs=inputs, **score_part(score, config.span)))
    ranking, source = given or load_ranking()  # default: a detection pass inside the run folder
    static = top_heads(ranking, config.static_top)
    tracer = Tracer(lm, trace)
    scorer = head_score(config, score)
    runner(run, samples, lambda enc: progressive_sample(tracer, enc, ks, static, config, scorer), len(samples), quiet)
    rows = run.sample_results()
    per_k = {f"k{k}": metric_arrays(rows, f"k{k}") for k in ks}
    result = summarise(per_k, sample_rng(config.seed, "progressive-stats"), config.n_boot, comparisons=())
    result.update(ks=list(ks), n_samples=len(rows), static_ranking=source, paper=PAPER_FIG3,
                  static_heads=[lm.layout.label(*divmod(int(i), lm.layout.n_heads)) for i in np.flatnonzero(static)],
                  static_top_requested=config.static_top,
                  static_note=static_cap_note(int(static.sum()), config.static_top))
    run.write_result("ablation_progressive", result)
    conds = result["conditions"]
    save_figure(progressive_curve(list(ks), [conds[f"k{k}"]["accuracy"] for k in ks],
                                   [conds[f"k{k}"]["compensation"] for k in ks], config.static_top,
                                   title=f"{lm.source}: progressive ablation ({config.method}), {len(rows)} samples"),
                 run.figure_path("ablation_progressive"))
    return run, result


def progressive_niah(length: int, n_samples: int, seed: int, haystack: str | None = None,
                     prompt_style: str = "auto") -> NiahConfig:
    """One sample per depth, depths evenly spaced over 0–100% (the paper only says 20 runs at 5000 tokens)."""
    if n_samples < 1:
        raise ConfigError("--samples must be at least 1")
    depths = tuple(dict.fromkeys(round(float(d), 1) for d in np.linspace(0, 100, n_samples)))
    return NiahConfig(lengths=(length,), depths=depths, samples_per_cell=1, haystack=haystack, seed=seed,
                      prompt_style=prompt_style)


def check_ks(ks: tuple[int, ...], n_heads: int) -> None:
    if not ks:
        raise ConfigError("--ks is empty")
    bad = [k for k in ks if not 0 <= k <= n_heads]
    if bad:
        raise ConfigError(f"k = {bad[0]} is outside 0..{n_heads} (the model has {n_heads} heads)")
