"""Shared benchmark helpers: NIAH prompts of a given length, timing, and peak memory in a fresh process."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import psutil
import torch

from dynheads.models import LoadedModel
from dynheads.tasks.niah import NiahConfig, niah_samples


def niah_prompt(lm: LoadedModel, length: int):
    """One encoded NIAH sample of `length` tokens with the needle at 50% depth."""
    return next(niah_samples(lm.tokenizer, NiahConfig(lengths=(length,), depths=(50,), samples_per_cell=1)))


def plain_generate(lm: LoadedModel, input_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                   cache: str | None = None) -> list[int]:
    """The baseline: transformers' greedy generate with SDPA and its default cache (DynamicCache), or
    cache="static" (StaticCache: preallocated for prompt + max_new_tokens, written in place)."""
    ids = torch.tensor([input_ids])
    extra = {"cache_implementation": cache} if cache else {}
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=stop_ids[0], **extra)
    return out[0, len(input_ids):].tolist()


def plain_exact(lm, input_ids: list[int], new_tokens: int, pad_id: int, cache: str | None = None) -> list[int]:
    """transformers' greedy generate with SDPA, forced to exactly `new_tokens` tokens (default or static cache)."""
    ids = torch.tensor([input_ids])
    extra = {"cache_implementation": cache} if cache else {}
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=pad_id, **extra)
    return out[0, len(input_ids):].tolist()


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each function, calls interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_growth_in_child(script: str, *args: str) -> float:
    """Run `script --child ARGS` in a fresh process; it prints {"growth": bytes} (peak RSS minus RSS before)."""
    out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{script} --child {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


def report_child_growth(fn: Callable[[], object], lm: LoadedModel | None = None) -> None:
    """In a child: RSS high-water mark during `fn` minus the RSS just before it, printed as JSON.

    With `lm`, a 3-token forward runs first: the weights are memory-mapped from the converted
    safetensors and paged in by the first forward, which would otherwise count as growth (the same
    ~500 MB on every side, hiding the difference between caches).
    """
    if lm is not None:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([[1, 2, 3]], device=lm.model.device))
    before = psutil.Process().memory_info().rss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"growth": max(peak - before, 0), "before": before}))


def bench_arguments(description: str = ""):
    """The flags every benchmark takes: --model, --lengths, --new-tokens, --repeats, --threads (and the hidden --child)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="default", help="a named model (default, gemma3-270m) or a model path")
    ap.add_argument("--lengths", default="1000,2000,4000,8000")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on shared cores)")
    ap.add_argument("--child", nargs=2, metavar=("CONDITION", "LENGTH"), help=argparse.SUPPRESS)
    return ap
