"""Head-sparse vs plain greedy generation: wall-time and peak-memory ratios, and where a step's time goes.

Conditions, all in this process and interleaved (median of --repeats); every one generates exactly
--new-tokens tokens (end-of-turn ignored: a sparse policy's answer can end sooner, which would flatter it):
  plain       transformers' greedy generate (SDPA, default cache), prefill included
  sparse      the tracer's head-sparse decoding (k KV heads open, the rest sinks + recent window),
              prefill included, no per-head rows recorded
and, on one shared prefill (decode only): `full` = the same loop with every head open (the stock
attention), `sparse` and `streaming` (no head open). For each: the fraction of the cache's keys a step
reads (`Sparsity.kv_read`) beside its fraction of the all-open step's time, and what the time would be if
it followed the keys exactly (streaming's time for the part that does not depend on the context, plus
the rest in proportion to the keys read). Targets (issue 18, k = 8 of 90 KV heads at 8K): sparse ≤ 0.40×
all-open, streaming ≤ 0.35×. --profile adds a torch.profiler breakdown of one decode step per condition
(weight matmuls, attention kernels, cache writes and gathers, other ops, and what no op accounts for:
Python and dispatch). Memory: each whole condition once in a fresh process, peak resident-set growth.
Usage: python bench/sparse_decoding.py [--model default] [--lengths 1000,2000,4000,8000] [--k 8] [--profile]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_arguments, median_times, niah_prompt, peak_growth_in_child, plain_exact, report_child_growth  # noqa: E402

from dynheads.models import load_model  # noqa: E402
from dynheads.tracing.sparse import Sparsity  # noqa: E402
from dynheads.tracing.tracer import TraceConfig, Tracer  # noqa: E402

# torch.profiler op names by what they do in a decode step (the rest is "other ops")
GROUPS = {"weights": ("aten::mm", "aten::addmm", "aten::linear"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                        "aten::bmm", "aten::_softmax", "aten::softmax"),
          "cache/gather": ("aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::index_copy_")}


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


def profile_step(tracer, state, mask, steps: int) -> dict[str, float]:
    """Milliseconds per decode step by op group (self CPU time), plus the unprofiled wall time."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    tracer.generate(state, heads=lambda t, p, f: mask)
    wall = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tracer.generate(state, heads=lambda t, p, f: mask)
    out = dict.fromkeys([*GROUPS, "other ops"], 0.0)
    for event in prof.key_averages():
        group = next((g for g, names in GROUPS.items() if event.key in names), "other ops")
        out[group] += event.self_cpu_time_total / 1e3 / steps
    out["not in ops"] = max(wall - sum(out.values()), 0.0)
    out["wall"] = wall
    return out


def main() -> None:
    ap = bench_arguments("head-sparse vs plain generation")
    ap.add_argument("--k", type=int, default=8, help="KV heads open per step (of layers × KV heads)")
    ap.add_argument("--profile", action="store_true", help="op-group breakdown of a decode step per condition")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    tracer = Tracer(lm, TraceConfig(max_new_tokens=args.new_tokens, record_rows=False, record_hidden=False))
    pad_id = min(tracer.stop_ids) if tracer.stop_ids else 0
    tracer.stop_ids = set()  # every condition runs exactly --new-tokens steps (a sparse answer may stop early)
    if args.child:
        cond, length = args.child
        enc = niah_prompt(lm, int(length))
        report_child_growth(whole(lm, tracer, enc, args.new_tokens, args.k, pad_id)[cond], lm)
        return
    n_units = lm.layout.n_layers * lm.layout.n_kv_heads
    sparsity = Sparsity()
    print(f"{args.model}: sink {sparsity.sink}, recent {sparsity.recent}, k = {args.k} of {n_units} KV heads open; "
          f"{args.new_tokens} new tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'tokens':>7} {'plain s':>8} {'sparse s':>9} {'time ×':>7} {'plain MB':>9} {'sparse MB':>10} {'mem ×':>6}"
          f" | decode only: {'full ms/step':>12} {'sparse: keys':>12} {'time':>6} {'if ∝ keys':>9}"
          f" {'streaming: keys':>15} {'time':>6}")
    for length in (int(v) for v in args.lengths.split(",")):
        enc = niah_prompt(lm, length)
        fns = whole(lm, tracer, enc, args.new_tokens, args.k, pad_id)
        times = median_times(fns, args.repeats)
        state = tracer.prefill(enc.input_ids)
        masks = {"full": _mask(lm, n_units), "sparse": _mask(lm, args.k), "streaming": _mask(lm, 0)}
        decode = median_times({n: (lambda m=m: tracer.generate(state, heads=lambda t, p, f: m, fork=True))
                               for n, m in masks.items()}, args.repeats)
        n_keys = len(enc.input_ids) - 1 + args.new_tokens // 2  # keys at the middle step
        keys = {n: sparsity.kv_read(m, n_keys, lm.layout.group_size) for n, m in masks.items()}
        frac = {n: decode[n] / decode["full"] for n in masks}
        # the context-independent part costs what streaming costs; the rest scales with the keys read
        ideal = frac["streaming"] + (1 - frac["streaming"]) * (keys["sparse"] - keys["streaming"]) / (1 - keys["streaming"])
        mem = {c: peak_growth_in_child(__file__, c, str(length), "--model", args.model, "--new-tokens",
                                       str(args.new_tokens), "--threads", str(args.threads), "--k", str(args.k))
               for c in fns}
        print(f"{length:>7} {times['plain']:>8.2f} {times['sparse']:>9.2f} {times['sparse'] / times['plain']:>7.3f} "
              f"{mem['plain'] / 2**20:>9.0f} {mem['sparse'] / 2**20:>10.0f} {mem['sparse'] / mem['plain']:>6.3f}"
              f" | {decode['full'] / args.new_tokens * 1e3:>25.1f} {keys['sparse']:>12.3f} {frac['sparse']:>6.3f}"
              f" {ideal:>9.3f} {keys['streaming']:>15.3f} {frac['streaming']:>6.3f}", flush=True)
        if args.profile:
            print(f"  per decode step at {length} tokens, ms (torch.profiler self time; 'not in ops' = wall − ops):")
            for name, mask in masks.items():
                prof = profile_step(tracer, state, mask, args.new_tokens)
                print(f"  {name:>10}: " + ", ".join(f"{g} {v:.1f}" for g, v in prof.items()), flush=True)


if __name__ == "__main__":
    main()
