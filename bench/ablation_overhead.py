"""Per-step ablation (the dynamic condition) vs plain greedy generation, and what forking a prefill costs.

Target (issue: per-step ablation): ≤ 2.3× the wall time of plain generation at 1K, 2K, 4K and 8K
prompt tokens. Every step of the ablation runs the clean pass, finds the step's dynamic heads
(Eq. 1) and, when there are any, recomputes the step with them masked. Both sides generate exactly
--new-tokens tokens (end-of-turn suppressed) from the same NIAH prompt, prefill included; median of
--repeats, calls interleaved. Also shown: traced generation without intervention, the share of
steps that needed the second (masked) pass, and the worst case `every step` (5 fixed heads masked
at every step, so every step runs twice). Fork: the prefill's time beside the cost of taking a fork back
to it after two steps (`Tracer.rewind`: the in-place cache moves a length, nothing is copied),
median of 20.
Usage: python bench/ablation_overhead.py [--model default] [--lengths 1000,2000,4000,8000] [--new-tokens 32]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_arguments, median_times, niah_prompt, plain_exact  # noqa: E402

from dynheads.headsets.apply import intervention as make_intervention  # noqa: E402
from dynheads.headsets.base import build  # noqa: E402
from dynheads.models import load_model  # noqa: E402
from dynheads.scores.base import get_score  # noqa: E402
from dynheads.tracing.tracer import TraceConfig, Tracer  # noqa: E402


def main() -> None:
    ap = bench_arguments("per-step ablation vs plain generation")
    ap.add_argument("--method", default="zero")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    tracer = Tracer(lm, TraceConfig(max_new_tokens=args.new_tokens, record_hidden=False))
    pad_id = min(tracer.stop_ids) if tracer.stop_ids else 0
    tracer.stop_ids = set()  # both sides run exactly --new-tokens steps
    masked_steps: list[float] = []
    fixed = build("static", ranking=np.arange(lm.layout.n_total, dtype=float).reshape(lm.layout.shape), k=5)

    def ablate(enc, select):
        intervention = make_intervention(select, enc, lm.layout, get_score("copy_paste").with_args(span="needle"))
        trace = tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans), intervention=intervention,
                                ablation=args.method, fork=False)
        if select is not fixed:
            masked_steps.append(float(np.mean([m.any() for m in trace.masks])))
        return trace

    print(f"{args.model}: {args.new_tokens} new tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'tokens':>7} {'plain s':>8} {'traced s':>9} {'ablate s':>9} {'traced ×':>9} {'ablate ×':>9} "
          f"{'masked steps':>13} {'≤2.3×':>6} {'every step ×':>13} {'prefill s':>10} {'fork µs':>8}")
    for length in (int(v) for v in args.lengths.split(",")):
        enc = niah_prompt(lm, length)
        masked_steps.clear()
        fns = {"plain": lambda: plain_exact(lm, enc.input_ids, args.new_tokens, pad_id),
               "traced": lambda: tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans), fork=False),
               "ablate": lambda: ablate(enc, build("dynamic")),
               "every_step": lambda: ablate(enc, fixed)}
        times = median_times(fns, args.repeats)
        ratio = times["ablate"] / times["plain"]
        t0 = time.perf_counter()
        state = tracer.prefill(enc.input_ids, enc.token_spans)
        prefill = time.perf_counter() - t0
        forks = []
        for _ in range(20):
            n_ids = len(state.ids)
            tracer.generate(state, max_new_tokens=2, fork=False)
            t0 = time.perf_counter()
            tracer.rewind(state, n_ids)
            forks.append(time.perf_counter() - t0)
        print(f"{length:>7} {times['plain']:>8.2f} {times['traced']:>9.2f} {times['ablate']:>9.2f} "
              f"{times['traced'] / times['plain']:>9.3f} {ratio:>9.3f} {np.mean(masked_steps):>13.2f} "
              f"{'yes' if ratio <= 2.3 else 'no':>6} {times['every_step'] / times['plain']:>13.3f} {prefill:>10.2f} "
              f"{statistics.median(forks) * 1e6:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
