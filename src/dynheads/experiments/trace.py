"""Detection runs: trace a task's samples with the plain tracer and the task's head score."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dynheads.config import run_config
from dynheads.models import LoadedModel
from dynheads.runs import RunDir
from dynheads.scores.base import get_score
from dynheads.tasks.niah import NiahConfig, niah_samples, score_response
from dynheads.tracing.runner import run_samples, trace_sample
from dynheads.tracing.tracer import TraceConfig, Tracer


def run_niah(lm: LoadedModel, niah: NiahConfig, out: str | Path, trace: TraceConfig = TraceConfig(),
             quiet: bool = False) -> RunDir:
    """Trace a NIAH grid into `out` (resuming finished samples) with the Eq. 1 copy-paste score."""
    score = get_score("copy_paste")
    trace = replace(trace, mass_spans=tuple(dict.fromkeys(trace.mass_spans + ("needle",))))
    config = run_config("niah", lm, niah.seed, task=niah, trace=trace,
                        score={"name": score.name, "args": {"span": "needle"}})
    run = RunDir.create(out, config)
    tracer = Tracer(lm, trace)
    samples = niah_samples(lm.tokenizer, niah, lm.max_positions)
    total = len(niah.lengths) * len(niah.depths) * niah.samples_per_cell
    run_samples(run, samples, lambda enc: trace_sample(tracer, enc, score, score_response), total, quiet)
    return run
