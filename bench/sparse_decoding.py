"""Head-sparse vs plain greedy generation on the default model: wall-time and peak-memory ratios.

Conditions, all in this process and interleaved (median of --repeats); every one generates exactly
--new-tokens tokens (end-of-turn ignored: a sparse policy's answer can end sooner, which would flatter it):
  plain       transformers' greedy generate (SDPA), prefill included
  sparse      the tracer's head-sparse decoding (static top-k KV heads open, the rest sinks + recent
              window), prefill included, no per-head rows recorded
and, on one shared prefill (decode only): `full` = the same loop with every head open (the stock
attention), `sparse` and `streaming` (no head open). Memory: each whole condition once in a fresh
process, peak resident-set growth during it. The KV cache is kept whole (closed heads gather from
it), so memory does not shrink; the time saved is attention reads, which on CPU at ≤ 8K is a small
part of a step next to the weight matmuls.
Usage: python bench/sparse_decoding.py [--lengths 1000,2000,4000,8000] [--new-tokens 32] [--k 8]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_arguments, median_times, niah_prompt, peak_growth_in_child, plain_exact, report_child_growth  # noqa: E402

from dynheads.models import load_model  # noqa: E402
from dynheads.tracing.sparse import Sparsity  # noqa: E402
from dynheads.tracing.tracer import TraceConfig, Tracer  # noqa: E402


def _mask(lm, k: int) -> np.ndarray:
    """k KV heads open: the first k in flat order (which heads does not change the cost)."""
    mask = np.zeros(lm.layout.n_layers * lm.layout.n_kv_heads, bool)
    mask[:k] = True
    return mask.reshape(lm.layout.n_layers, lm.layout.n_kv_heads)


def whole(lm, tracer, enc, new_tokens, k, pad_id):
    opened = _mask(lm, k)
    return {
        "plain": lambda: plain_exact(lm, enc.input_ids, new_tokens, pad_id),
        "sparse": lambda: tracer.generate(tracer.prefill(enc.input_ids), fork=False,
                                          heads=lambda t, p, f: opened, sparsity=Sparsity()),
    }


def main() -> None:
    ap = bench_arguments("head-sparse vs plain generation")
    ap.add_argument("--k", type=int, default=8, help="KV heads open per step (of layers × KV heads)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=args.new_tokens, record_rows=False, record_hidden=False))
    pad_id = min(tracer.stop_ids)
    tracer.stop_ids = set()  # every condition runs exactly --new-tokens steps (a sparse answer may stop early)
    if args.child:
        cond, length = args.child
        report_child_growth(whole(lm, tracer, niah_prompt(lm, int(length)), args.new_tokens, args.k, pad_id)[cond])
        return
    print(f"Sparsity: sink {Sparsity().sink}, recent {Sparsity().recent}, k = {args.k} of "
          f"{lm.layout.n_layers * lm.layout.n_kv_heads} KV heads open; {args.new_tokens} new tokens")
    print(f"{'tokens':>7} {'plain s':>8} {'sparse s':>9} {'time ×':>7} {'plain MB':>9} {'sparse MB':>10} {'mem ×':>6}"
          f" | decode only: {'full s':>7} {'sparse ×':>9} {'streaming ×':>12}")
    for length in (int(v) for v in args.lengths.split(",")):
        enc = niah_prompt(lm, length)
        fns = whole(lm, tracer, enc, args.new_tokens, args.k, pad_id)
        times = median_times(fns, args.repeats)
        state = tracer.prefill(enc.input_ids)
        steps = {"full": _mask(lm, lm.layout.n_layers * lm.layout.n_kv_heads), "sparse": _mask(lm, args.k),
                 "streaming": _mask(lm, 0)}
        decode = median_times({n: (lambda m=m: tracer.generate(state, heads=lambda t, p, f: m, fork=True))
                               for n, m in steps.items()}, args.repeats)
        mem = {c: peak_growth_in_child(__file__, c, str(length), "--new-tokens", str(args.new_tokens),
                                       "--threads", str(args.threads), "--k", str(args.k)) for c in fns}
        print(f"{length:>7} {times['plain']:>8.2f} {times['sparse']:>9.2f} {times['sparse'] / times['plain']:>7.3f} "
              f"{mem['plain'] / 2**20:>9.0f} {mem['sparse'] / 2**20:>10.0f} {mem['sparse'] / mem['plain']:>6.3f}"
              f" | {decode['full']:>20.2f} {decode['sparse'] / decode['full']:>9.3f} "
              f"{decode['streaming'] / decode['full']:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
