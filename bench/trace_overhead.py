"""Traced vs plain greedy generation: wall-time and peak-memory ratios against both of transformers' caches.

Conditions (same NIAH prompt, exactly --new-tokens tokens each, end-of-turn ignored so every side does
the same number of steps): `plain` = `generate` with its default cache (DynamicCache: torch.cat per
step), `static` = `generate(cache_implementation="static")` (StaticCache, preallocated for prompt +
new tokens and written in place), `traced` = the tracer (every head's row recorded at every step).
Targets (issue 18): traced ≤ 1.00× plain at 1K–8K, ≤ 1.05× static, peak memory ≤ 1.05×.
Time: median of --repeats in this process, calls interleaved. Memory: each condition once in a fresh
process, peak resident-set growth during it (KV cache, activations, records; the model excluded).
On sliding-window models (Gemma 3) transformers' caches keep only the window in sliding layers, while
the tracer keeps every key (forks and per-step ablation need them): that memory, and the attention
reads over it, is the price of forking.
Usage: python bench/trace_overhead.py [--model default] [--lengths 1000,2000,4000,8000] [--new-tokens 32]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_arguments, median_times, niah_prompt, peak_growth_in_child, plain_exact, report_child_growth  # noqa: E402

from dynheads.models import load_model  # noqa: E402
from dynheads.tracing.tracer import TraceConfig, Tracer  # noqa: E402

CONDITIONS = ("plain", "static", "traced")


def conditions(lm, tracer, enc, new_tokens, pad_id):
    return {
        "plain": lambda: plain_exact(lm, enc.input_ids, new_tokens, pad_id),
        "static": lambda: plain_exact(lm, enc.input_ids, new_tokens, pad_id, cache="static"),
        "traced": lambda: tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans), fork=False),
    }


def same_tokens(plain: list[int], static: list[int], traced: list[int], stops: set[int]) -> str:
    """Compare the three up to the traced side's first end of turn: `generate` (min_new_tokens) suppresses
    end of turn, so at that step it takes the runner-up and the paths part there by construction."""
    n = next((i for i, t in enumerate(traced) if t in stops), len(traced))
    a, b, c = plain[:n], static[:n], traced[:n]
    same = ("yes" if a == b == c else "traced differs" if a == b else "plain≠static" if a == c else "all differ")
    return same + (f" ({n} tokens)" if n < len(traced) else "")


def main() -> None:
    ap = bench_arguments("traced vs plain generation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    tracer = Tracer(lm, TraceConfig(max_new_tokens=args.new_tokens))
    stops = set(tracer.stop_ids)
    pad_id = min(stops) if stops else 0
    tracer.stop_ids = set()  # every condition runs exactly --new-tokens steps
    if args.child:
        cond, length = args.child
        enc = niah_prompt(lm, int(length))
        report_child_growth(conditions(lm, tracer, enc, args.new_tokens, pad_id)[cond], lm)
        return
    print(f"{args.model}: {args.new_tokens} new tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'tokens':>7} {'plain s':>8} {'static s':>9} {'traced s':>9} {'÷plain':>7} {'÷static':>8} "
          f"{'plain MB':>9} {'static MB':>10} {'traced MB':>10} {'mem÷plain':>10} {'mem÷static':>11} same")
    for length in (int(v) for v in args.lengths.split(",")):
        enc = niah_prompt(lm, length)
        fns = conditions(lm, tracer, enc, args.new_tokens, pad_id)
        same = same_tokens(fns["plain"](), fns["static"](), fns["traced"]().token_ids, stops)
        t = median_times(fns, args.repeats)
        mem = {c: peak_growth_in_child(__file__, c, str(length), "--model", args.model, "--new-tokens",
                                       str(args.new_tokens), "--threads", str(args.threads)) for c in CONDITIONS}
        mb = {c: mem[c] / 2**20 for c in CONDITIONS}
        print(f"{length:>7} {t['plain']:>8.2f} {t['static']:>9.2f} {t['traced']:>9.2f} {t['traced'] / t['plain']:>7.3f} "
              f"{t['traced'] / t['static']:>8.3f} {mb['plain']:>9.0f} {mb['static']:>10.0f} {mb['traced']:>10.0f} "
              f"{mem['traced'] / mem['plain']:>10.3f} {mem['traced'] / mem['static']:>11.3f} {same}", flush=True)


if __name__ == "__main__":
    main()
