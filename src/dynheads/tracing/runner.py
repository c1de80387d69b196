"""Run encoded samples through the tracer into a run folder, one sample at a time, resumably.

`run_samples` is the shared per-sample driver (skip finished samples, progress on stderr, atomic
write per sample); `trace_sample` is the plain traced generation that `niah` and `multihop` use.
Experiments that intervene (ablation, RAG) pass their own per-sample function to `run_samples`.
"""
from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
from tqdm import tqdm

from dynheads.errors import Interrupted
from dynheads.runs import RunDir
from dynheads.scores.base import HeadScore
from dynheads.tasks.base import EncodedSample
from dynheads.tracing.tracer import Trace, Tracer

log = logging.getLogger(__name__)

# Returns (record arrays, result fields) for one sample.
SampleWork = Callable[[EncodedSample], tuple[dict[str, np.ndarray], dict[str, Any]]]
T = TypeVar("T")


def first_checked(samples: Iterable[T]) -> Iterator[T]:
    """The same samples, with the first one built now: a bad grid, input file or prompt raises here,
    before the caller creates the run folder (a failed run must not leave a config behind)."""
    items = iter(samples)
    first = next(items, None)
    return items if first is None else itertools.chain([first], items)


@dataclass(frozen=True)
class SampleWorkWithInputs:
    """Per-sample work that needs per-sample data from the run folder (e.g. a first pass stored there).

    `read_inputs(encoded)` runs where the run folder is (this process, or a distributed runner's
    driver); `work(encoded, inputs)` wherever samples run. A distributed runner ships `work` once and
    each sample's inputs with the sample, so no worker needs the run folder's disk.
    """

    work: Callable[[EncodedSample, Any], tuple[dict[str, np.ndarray], dict[str, Any]]]
    read_inputs: Callable[[EncodedSample], Any]

    def __call__(self, encoded: EncodedSample) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self.work(encoded, self.read_inputs(encoded))


# Drives `work` over the unfinished samples into a run folder: `run_samples` here, or a distributed
# runner (sweep/ray_runner.py) that writes the same folder from the driver.
Runner = Callable[..., int]


def run_samples(run: RunDir, samples: Iterable[EncodedSample], work: SampleWork, total: int | None = None,
                quiet: bool = False) -> int:
    """Apply `work` to every unfinished sample and write its records; returns how many were run."""
    done = run.done_samples()
    items = iter(enumerate(samples))
    first = next(items, None)  # bad input in the first sample fails before any progress bar is drawn
    if first is None:
        return 0
    n_run, last = 0, None
    bar = tqdm(total=total, desc=run.path.name, unit="sample", file=sys.stderr, disable=quiet, leave=False)
    try:
        for order, encoded in itertools.chain([first], items):
            bar.update(1)
            if encoded.sample.id in done:
                continue
            arrays, result = work(encoded)
            write_sample(run, order, encoded, arrays, result)
            n_run += 1
            last = encoded.sample.id
    except KeyboardInterrupt:
        bar.close()
        raise interrupted(run, len(done) + n_run, total, n_run, last) from None
    finally:
        bar.close()
    return n_run


def interrupted(run: RunDir, finished: int, total: int | None, n_run: int, last: str | None) -> Interrupted:
    """The one-line error of a run stopped by Ctrl-C: how far it got, where, and how to resume."""
    where = f"; last finished: {last}" if last else ""
    return Interrupted(f"interrupted: {finished}{f' of {total}' if total else ''} samples are finished in "
                       f"{run.path} ({n_run} in this call{where}); rerun the same command to resume")


def write_sample(run: RunDir, order: int, encoded: EncodedSample, arrays: dict[str, np.ndarray],
                 result: dict[str, Any]) -> None:
    """Write one finished sample (records, then its result file) with the fields every run carries."""
    run.write_sample(encoded.sample.id, arrays, {
        "order": order, "sample": encoded.sample.to_json(), "token_spans": encoded.token_spans,
        "prompt_tokens": encoded.prompt_len, "context_tokens": list(encoded.context_tokens), **result})


def trace_sample(tracer: Tracer, encoded: EncodedSample, score: HeadScore,
                 metric: Callable[[str, Any], dict[str, float]], **generate_args) -> tuple[dict, dict]:
    """Traced greedy generation of one sample, its head scores and its answer metrics."""
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    trace = tracer.generate(state, fork=False, **generate_args)
    return trace_outputs(tracer, trace, encoded, score, metric)


def trace_outputs(tracer: Tracer, trace: Trace, encoded: EncodedSample, score: HeadScore,
                  metric: Callable[[str, Any], dict[str, float]]) -> tuple[dict, dict]:
    """Record arrays (with the run's head score) and result fields of a finished trace."""
    arrays = trace.arrays()
    if len(arrays["token_id"]):
        arrays["score"] = score(arrays, encoded.token_spans)
    else:
        arrays["score"] = np.zeros((0,) + tracer.lm.layout.shape, np.float32)
    response = tracer.lm.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
    tokens = [tracer.lm.tokenizer.decode([t]) for t in trace.token_ids]
    result = {"response": response, "tokens": tokens, "n_steps": len(trace.token_ids),
              "stopped": trace.stop_id is not None, **metric(response, encoded.sample)}
    return arrays, result
