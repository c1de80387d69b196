"""Long-context NIAH (16K, 32K tokens on Gemma 3 270M): time per sample split into prefill and decode,
peak memory (after the prefill and after the decode: what recording adds), accuracy and record sizes; or, with --prefill-only, one prefill in one call against the
chunked prefill (time, peak memory, and a digest of every cached key and value, which must match).

Traces through the same code as `dynheads niah` (`run_niah` into --out, so `dynheads view` opens the
folder); the split comes from timing every forward call of the model: calls with more than one token
are the prefill (its chunks), single-token calls the decode steps. Peak memory: the process's
resident-set high-water mark, and its growth over the loaded model (one length per process).
Usage: python bench/long_context.py --model gemma3-270m --length 32000 --depths 50 --out runs/niah32k
       python bench/long_context.py --model gemma3-270m --length 16000 --prefill-only [--one-call]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import psutil
import torch


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def time_forwards(model) -> list[tuple[int, float, float]]:
    """(tokens, seconds, process peak GiB after the call) of every forward call of `model` from now on."""
    calls: list[tuple[int, float, float]] = []
    started: list[float] = []
    model.register_forward_pre_hook(lambda m, a, kw: started.append(time.perf_counter()), with_kwargs=True)
    model.register_forward_hook(lambda m, a, kw, out: calls.append(
        (kw["input_ids"].shape[1], time.perf_counter() - started.pop(), peak_gib())), with_kwargs=True)
    return calls


def prefill_only(lm, args) -> None:
    import dynheads.tracing.cache as cache_module
    from dynheads.tasks.niah import NiahConfig, niah_samples
    from dynheads.tracing.tracer import TraceConfig, Tracer

    if args.one_call:
        cache_module.ONE_CALL = 10**9
    enc = next(niah_samples(lm.tokenizer, NiahConfig(lengths=(args.length,), depths=(args.depths[0],),
                                                      samples_per_cell=1), lm.max_positions))
    tracer = Tracer(lm, TraceConfig(max_new_tokens=args.max_new_tokens))
    before = psutil.Process().memory_info().rss / 2**30
    t0 = time.perf_counter()
    state = tracer.prefill(enc.input_ids, enc.token_spans)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for layer in state.cache.layers:
        digest.update(layer.keys.contiguous().numpy().tobytes())
        digest.update(layer.values.contiguous().numpy().tobytes())
    print(json.dumps({"length": len(enc.input_ids), "one_call": args.one_call, "prefill_s": round(seconds, 1),
                      "peak_gib": round(peak_gib(), 2), "growth_gib": round(peak_gib() - before, 2),
                      "cache_sha256": digest.hexdigest()[:16]}), flush=True)


def traced_run(lm, args) -> None:
    from dynheads.commands import run_niah
    from dynheads.runs import RunDir

    calls = time_forwards(lm.model)
    per_sample: list[list[tuple[int, float, float]]] = []

    def runner(run, samples, work, total=None, quiet=False):
        from dynheads.tracing.runner import run_samples

        def timed(enc):
            calls.clear()
            out = work(enc)
            per_sample.append(list(calls))
            return out
        return run_samples(run, samples, timed, total, quiet=True)

    before = psutil.Process().memory_info().rss / 2**30
    run = run_niah(lm, args.out, lengths=(args.length,), depths=tuple(args.depths), samples_per_cell=args.samples,
                   max_new_tokens=args.max_new_tokens, topk=args.topk, quiet=True, runner=runner)
    results = RunDir.open(run.path).sample_results()
    print(f"{args.model}: {args.length} tokens, top-{args.topk}, {torch.get_num_threads()} thread(s); "
          f"process peak {peak_gib():.2f} GiB, growth over the loaded model {peak_gib() - before:.2f} GiB")
    print(f"{'sample':>22} {'prefill s':>10} {'decode s':>9} {'steps':>6} {'ms/step':>8} {'acc':>5} {'records KB':>11} "
          f"{'sample json KB':>15} {'peak GiB after prefill':>23} {'after decode':>13}")
    for result, calls_of in zip(results[-len(per_sample):], per_sample):
        prefill = sum(s for n, s, _ in calls_of if n > 1)
        decode = [s for n, s, _ in calls_of if n == 1]
        after_prefill = max(p for n, _, p in calls_of if n > 1)
        rec = run.path / "records" / f"{result['id']}.npz"
        js = run.path / "samples" / f"{result['id']}.json"
        print(f"{result['id']:>22} {prefill:>10.1f} {sum(decode):>9.1f} {len(decode):>6} "
              f"{1e3 * sum(decode) / max(len(decode), 1):>8.0f} {result.get('accuracy', float('nan')):>5.2f} "
              f"{rec.stat().st_size / 1024:>11.1f} {js.stat().st_size / 1024:>15.1f} {after_prefill:>23.2f} "
              f"{calls_of[-1][2]:>13.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=32000)
    ap.add_argument("--depths", type=lambda s: [int(v) for v in s.split(",")], default=[50])
    ap.add_argument("--samples", type=int, default=1, help="samples per depth")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--topk", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/long-context"))
    ap.add_argument("--prefill-only", action="store_true", help="time one prefill and digest its cache")
    ap.add_argument("--one-call", action="store_true", help="with --prefill-only: the whole prompt in one call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dynheads.models import load_model

    lm = load_model(args.model)
    with torch.no_grad():  # page the memory-mapped weights in, so growth counts the run only
        lm.model(input_ids=torch.tensor([[1, 2, 3]]))
    prefill_only(lm, args) if args.prefill_only else traced_run(lm, args)


if __name__ == "__main__":
    sys.exit(main())
