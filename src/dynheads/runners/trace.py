"""Traced runs: a registered task's samples through the plain tracer, scored with the task's head score.

`run_niah` (NIAH, Eq. 1 copy-paste score on the needle by default) and `run_multihop` (HotpotQA-style QA,
Eq. 2 reasoning score on the supporting facts by default, EM/F1, and the Fig. 6 grid of context length ×
support depth). `score` (`--score`) names another registered head score; it reads the task's span.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dynheads.config import run_config
from dynheads.errors import ConfigError
from dynheads.models import LoadedModel
from dynheads.runs import RunDir
from dynheads.scores.base import HeadScore, get_score
from dynheads.tasks.base import Task, get_task, resolve_prompt_style
from dynheads.tasks.multihop import MultihopConfig, load_questions, score_answer
from dynheads.tasks.niah import NiahConfig, niah_inputs
from dynheads.tracing.runner import Runner, first_checked, run_samples, trace_sample
from dynheads.tracing.tracer import TraceConfig, Tracer

__all__ = ["run_niah", "run_multihop", "task_score", "with_prompt_style", "niah_inputs", "check_prompt_budget",
           "score_answer", "fig6_table", "write_multihop_summary", "format_fig6_table", "Fig6Table"]


def task_score(task: Task, score: str | None = None) -> tuple[HeadScore, dict[str, Any]]:
    """The run's head score (the task's unless `score` names another) bound to the task's span, and the run
    config's `score` entry."""
    name = score or task.score
    return get_score(name).with_args(span=task.span), {"name": name, "args": {"span": task.span}}


def run_niah(lm: LoadedModel, niah: NiahConfig, out: str | Path, trace: TraceConfig = TraceConfig(),
             quiet: bool = False, runner: Runner = run_samples, score: str | None = None) -> RunDir:
    """Trace a NIAH grid into `out` (resuming finished samples) with the task's head score (Eq. 1 by default)."""
    task = get_task("niah")
    head_score, score_entry = task_score(task, score)
    n_needles = getattr(niah, "num_needles", 1)  # MultiNiahConfig (tasks/multineedle.py): one span per needle
    each = tuple(f"needle_{i}" for i in range(n_needles)) if n_needles > 1 else ()
    trace = replace(trace, mass_spans=tuple(dict.fromkeys(trace.mass_spans + ("needle",) + each)))
    niah, trace = with_prompt_style(lm, niah, trace)
    niah, inputs = task.inputs(niah)
    check_prompt_budget(niah.lengths, trace.max_new_tokens, lm.max_positions)
    samples = first_checked(task.samples(lm.tokenizer, niah, lm.max_positions))  # bad input: before the folder
    config = run_config("niah", lm, niah.seed, task=niah, trace=trace, inputs=inputs, score=score_entry)
    run = RunDir.create(out, config)
    tracer = Tracer(lm, trace)
    total = len(niah.lengths) * len(niah.depths) * niah.samples_per_cell

    def work(enc):
        arrays, result = trace_sample(tracer, enc, head_score, task.metric)
        if each:  # which needle each head copies from, per step (analyses/needles.py)
            from dynheads.analyses.needles import needle_index

            arrays["needle_index"] = (needle_index(arrays, enc.token_spans, n_needles) if len(arrays["token_id"])
                                      else np.zeros((0,) + lm.layout.shape, np.int8))
        return arrays, result

    runner(run, samples, work, total, quiet)
    return run


def with_prompt_style(lm: LoadedModel, task, trace: TraceConfig):
    """The task config with its prompt style resolved for this model's tokenizer (auto → chat when it has a
    chat template), and the trace config with the stop rule of that style (completion: the first line break)."""
    style = resolve_prompt_style(lm.tokenizer, task.prompt_style)
    return replace(task, prompt_style=style), replace(trace, stop_at_newline=style == "completion")


def check_prompt_budget(lengths, max_new_tokens: int, max_positions: int | None) -> None:
    """Every prompt plus its answer budget must fit the model's positions (else generation runs past them)."""
    too_long = [n for n in lengths if max_positions and n + max_new_tokens > max_positions]
    if too_long:
        raise ConfigError(f"context length {too_long[0]} + {max_new_tokens} new tokens is above the model's maximum "
                          f"of {max_positions} positions (longest usable length: {max_positions - max_new_tokens})")


# --- multi-hop QA (paper Sec. 4) ---------------------------------------------------------------------

@dataclass
class Fig6Table:
    """Samples and mean F1 per (context length bin × support depth bin); Fig. 6's grid (our reading)."""

    length_centres: list[int]  # tokens
    depth_centres: list[float]  # percent
    n: list[list[int]]  # [length bins][depth bins]
    mean_f1: list[list[float | None]]  # None where a cell has no sample
    n_outside: int  # samples outside the grid (longer contexts, or no support)


def fig6_table(rows: list[tuple[int, float, float]], bins=None) -> Fig6Table:
    """rows: (context tokens, support depth in %, F1) per sample → the Fig. 6 grid of counts and mean F1."""
    from dynheads.tasks.multihop import Fig6Bins, fig6_cell

    bins = bins or Fig6Bins()
    n = np.zeros((bins.n_length_bins, bins.n_depth_bins), int)
    total = np.zeros(n.shape)
    outside = 0
    for length, depth, f1 in rows:
        cell = fig6_cell(int(length), float(depth), bins)
        if cell is None:
            outside += 1
            continue
        n[cell] += 1
        total[cell] += f1
    mean = [[float(total[i, j] / n[i, j]) if n[i, j] else None for j in range(n.shape[1])] for i in range(n.shape[0])]
    return Fig6Table(bins.length_centres(), bins.depth_centres(), n.tolist(), mean, outside)


def run_multihop(lm: LoadedModel, data_path: str | Path, limit: int | None, out: str | Path,
                 trace_config: TraceConfig = TraceConfig(), format: str = "auto", quiet: bool = False,
                 prompt: str = "short", runner: Runner = run_samples, prompt_style: str = "auto",
                 score: str | None = None) -> RunDir:
    """Trace multi-hop QA into `out` (resuming) with the task's head score (Eq. 2 on the supporting facts by default).

    Writes per-sample EM/F1, context length and support depth; results/multihop.json holds the load
    report (records skipped because a supporting fact is missing), EM/F1 and the Fig. 6 table, and
    figures/fig6_f1.png draws it.
    """
    from dynheads.errors import DataError
    from dynheads.tasks.multihop import support_depth

    task = get_task("multihop")
    head_score, score_entry = task_score(task, score)
    config, trace_config = with_prompt_style(lm, MultihopConfig(data_path, limit, format, prompt, prompt_style),
                                             trace_config)
    config, inputs = task.inputs(config)
    loaded = load_questions(config)  # the load report for results/multihop.json
    trace = replace(trace_config, mass_spans=tuple(dict.fromkeys(head_score.mass_spans + tuple(
        n for n in trace_config.mass_spans if n != "needle"))))
    samples = first_checked(task.samples(lm.tokenizer, config, lm.max_positions))  # bad input: before the folder
    run = RunDir.create(out, run_config("multihop", lm, 0, task=config, trace=trace, inputs=inputs,
                                        score=score_entry))
    tracer = Tracer(lm, trace)

    def work(enc):
        if lm.max_positions and enc.prompt_len + trace.max_new_tokens > lm.max_positions:
            raise DataError(f"{data_path}: sample {enc.sample.id}: prompt of {enc.prompt_len} tokens is too long "
                            f"for the model's {lm.max_positions} positions")
        arrays, result = trace_sample(tracer, enc, head_score, task.metric)
        cs, ce = enc.context_tokens
        depth = support_depth(enc.sample.spans["support"], len(enc.sample.context))
        return arrays, {**result, "context_length": ce - cs, "support_depth": depth}

    runner(run, samples, work, len(loaded), quiet)
    write_multihop_summary(run, loaded.report)
    return run


def write_multihop_summary(run: RunDir, report) -> dict[str, Any]:
    """results/multihop.json (EM/F1, load report, Fig. 6 table) and figures/fig6_f1.png of a multihop run."""
    from dynheads.report.multihop_figures import fig6_heatmap

    results = run.sample_results()
    table = fig6_table([(r["context_length"], r["support_depth"], r["f1"]) for r in results])
    summary = {"n_samples": len(results), "em": float(np.mean([r["em"] for r in results])),
               "f1": float(np.mean([r["f1"] for r in results])), "load_report": asdict(report), "fig6": asdict(table)}
    run.write_result("multihop", summary)
    fig = fig6_heatmap(table, title=f"{Path(run.config['model']['source']).name}: F1 by context length × support depth")
    fig.savefig(run.figure_path("fig6_f1"), dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return summary


def format_fig6_table(table: dict[str, Any]) -> str:
    """The Fig. 6 grid as text: one row per context-length bin, `n:F1` per support-depth bin."""
    head = f"{'ctx tokens':>10} | " + " ".join(f"{d:>7.0f}%" for d in table["depth_centres"])
    lines = [head]
    for centre, ns, f1s in zip(table["length_centres"], table["n"], table["mean_f1"]):
        if any(ns):
            lines.append(f"{centre:>10} | " + " ".join(f"{n:>2}:{f:.2f}" if n else f"{'.':>8}" for n, f in zip(ns, f1s)))
    lines.append(f"(cells: samples:mean F1; {table['n_outside']} samples outside the grid)")
    return "\n".join(lines)
