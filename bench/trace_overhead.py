"""Traced vs plain greedy generation on the default model: wall-time and peak-memory ratios.

Targets (issue 2): traced ≤ 1.15× the time and ≤ 1.10× the peak memory of plain generation at
1K, 2K, 4K and 8K prompt tokens. Time: median of 3 in this process, calls interleaved. Memory:
each condition runs once in a fresh process; we report the peak resident-set growth during
generation (KV cache, activations, records) and the whole-process peak (model included).
Usage: python bench/trace_overhead.py [--lengths 1000,2000,4000,8000] [--new-tokens 32]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_arguments, median_times, niah_prompt, peak_growth_in_child, plain_generate, report_child_growth  # noqa: E402

from dynheads.models import load_model  # noqa: E402
from dynheads.tracing.tracer import TraceConfig, Tracer  # noqa: E402


def conditions(lm, tracer, enc, new_tokens):
    stop_ids = sorted(tracer.stop_ids)
    return {
        "plain": lambda: plain_generate(lm, enc.input_ids, new_tokens, stop_ids),
        "traced": lambda: tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans), fork=False),
    }


def main() -> None:
    ap = bench_arguments("traced vs plain generation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=args.new_tokens))
    if args.child:
        cond, length = args.child
        enc = niah_prompt(lm, int(length))
        report_child_growth(conditions(lm, tracer, enc, args.new_tokens)[cond])
        return
    print(f"{'tokens':>7} {'plain s':>8} {'traced s':>9} {'time ×':>7} {'plain MB':>9} {'traced MB':>10} {'mem ×':>6} same")
    for length in (int(v) for v in args.lengths.split(",")):
        enc = niah_prompt(lm, length)
        fns = conditions(lm, tracer, enc, args.new_tokens)
        same = [t for t in fns["plain"]() if t not in tracer.stop_ids] == fns["traced"]().token_ids
        times = median_times(fns, args.repeats)
        mem = {c: peak_growth_in_child(__file__, c, str(length), "--new-tokens", str(args.new_tokens),
                                       "--threads", str(args.threads))
               for c in fns}
        print(f"{length:>7} {times['plain']:>8.2f} {times['traced']:>9.2f} {times['traced'] / times['plain']:>7.3f} "
              f"{mem['plain'] / 2**20:>9.0f} {mem['traced'] / 2**20:>10.0f} {mem['traced'] / mem['plain']:>6.3f} {same}",
              flush=True)


if __name__ == "__main__":
    main()
