"""The commands that need the model, as functions of their flags' values (the CLI's names, typed).

The typer commands and every `dynheads sweep` cell call the same function, so a sweep cell is
exactly the command it names. Each command has a model-free `check` (bad input fails before any
model loads) and a `run(lm, out, ...)` that returns what the command prints from. `runner` drives
the per-sample work: `run_samples` (one process) or a distributed runner (sweep/ray_runner.py).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from dynheads.errors import ConfigError
from dynheads.registry import Registry


@dataclass(frozen=True)
class Command:
    """One model-running command: model-free validation and the run itself."""

    check: Callable[..., None]  # (**params) -> None; raises ConfigError/DataError
    run: Callable[..., Any]  # (lm, out, *, quiet, runner, **params) -> RunDir or (RunDir, result)

    def params(self) -> dict[str, Any]:
        """Parameter names and defaults of `run` (what a sweep SPEC may set)."""
        skip = {"lm", "out", "quiet", "runner"}
        return {n: p.default for n, p in inspect.signature(self.run).parameters.items() if n not in skip}


commands: Registry[Command] = Registry("experiment")


def _runner():
    from dynheads.tracing.runner import run_samples

    return run_samples


# --- niah ------------------------------------------------------------------------------------
def niah_config(lengths, depths, samples_per_cell: int = 2, haystack: str | None = None,
                needles: str | None = None, seed: int = 0, num_needles: int = 1, mode: str | None = None,
                prompt_style: str = "auto"):
    """NiahConfig (one needle) or MultiNiahConfig (several) from the niah flags."""
    from dynheads.tasks.base import check_prompt_style
    from dynheads.tasks.multineedle import niah_config as config

    check_prompt_style(prompt_style)
    return config(num_needles, mode, lengths=_ints(lengths, "lengths"), depths=_floats(depths, "depths"),
                  samples_per_cell=samples_per_cell, haystack=haystack, needles=needles, seed=seed,
                  prompt_style=prompt_style)


def run_niah(lm, out, *, lengths=(1000, 2000, 4000), depths=(0, 25, 50, 75, 100), samples_per_cell: int = 2,
             haystack: str | None = None, needles: str | None = None, num_needles: int = 1, mode: str | None = None,
             max_new_tokens: int = 48, topk: int = 1, seed: int = 0, prompt_style: str = "auto",
             score: str | None = None, quiet: bool = False, runner=None):
    """Trace a NIAH grid (the `niah` command); `score`: a registered head score (default: the task's, Eq. 1)."""
    from dynheads.runners.trace import run_niah as trace_niah
    from dynheads.tracing.tracer import TraceConfig

    cfg = niah_config(lengths, depths, samples_per_cell, haystack, needles, seed, num_needles, mode, prompt_style)
    return trace_niah(lm, cfg, out, TraceConfig(max_new_tokens=max_new_tokens, topk=topk), quiet, runner or _runner(),
                      score)


def check_niah(lengths=(1000,), depths=(0,), samples_per_cell: int = 2, haystack: str | None = None,
               needles: str | None = None, out=None, num_needles: int = 1, mode: str | None = None,
               prompt_style: str = "auto", score: str | None = None, **_):
    """The NIAH grid, its input files, the score and --out (the lengths against the model are checked with the samples)."""
    check_task("niah", niah_config(lengths, depths, samples_per_cell, haystack, needles, 0, num_needles, mode,
                                   prompt_style), out, score)


def check_task(name: str, config, out=None, score: str | None = None) -> None:
    """A registered task's model-free checks of its config, the head score's name, and --out."""
    from dynheads.runs import check_out
    from dynheads.scores.base import get_score
    from dynheads.tasks.base import get_task

    get_task(name).check(config)
    if score is not None:
        get_score(score)
    if out is not None:
        check_out(out)


commands.register("niah")(Command(check_niah, run_niah))


# --- ablation ----------------------------------------------------------------------------------
def run_ablate(lm, out, *, lengths=(1000, 2000, 4000), depths=(0, 25, 50, 75, 100), samples_per_cell: int = 3,
               static_ranking: str | None = None, method: str = "zero", match: str = "average",
               match_scope: str = "run", random_per_step: bool = False, haystack: str | None = None, max_new_tokens: int = 48,
               n_boot: int = 2000, seed: int = 0, prompt_style: str = "auto", score: str | None = None,
               quiet: bool = False, runner=None):
    """Per-step ablation grid (the `ablate` command); returns (run, result). `score` defines D_t (default Eq. 1)."""
    from dynheads.runners import ablation as abl
    from dynheads.tracing.tracer import TraceConfig

    niah = niah_config(lengths, depths, samples_per_cell, haystack, None, seed, prompt_style=prompt_style)
    config = abl.AblationConfig(method=method, match=match, match_scope=match_scope, random_per_step=random_per_step,
                                static_ranking=static_ranking, n_boot=n_boot, seed=seed)
    return abl.run_ablation(lm, niah, out, config, TraceConfig(max_new_tokens=max_new_tokens), quiet,
                            runner or _runner(), score)


def check_ablate(lengths=(1000,), depths=(0,), samples_per_cell: int = 3, method: str = "zero",
                 match: str = "average", haystack: str | None = None, static_ranking: str | None = None,
                 out=None, match_scope: str = "run", prompt_style: str = "auto", score: str | None = None, **_):
    check_niah(lengths, depths, samples_per_cell, haystack, None, out, prompt_style=prompt_style, score=score)
    check_ranking(static_ranking)
    from dynheads.runners.ablation import AblationConfig  # imports torch: after the cheap checks

    AblationConfig(method=method, match=match, match_scope=match_scope)


commands.register("ablate")(Command(check_ablate, run_ablate))


def run_ablate_progressive(lm, out, *, length: int = 2000, ks=(0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60,
                                                                65, 70),
                           samples: int = 20, static_ranking: str | None = None, static_top: int = 20,
                           method: str = "zero", haystack: str | None = None, max_new_tokens: int = 48,
                           n_boot: int = 2000, seed: int = 0, prompt_style: str = "auto", score: str | None = None,
                           quiet: bool = False, runner=None):
    """Progressive ablation (the `ablate-progressive` command); returns (run, result). `score` defines D_t."""
    from dynheads.runners import progressive as prog
    from dynheads.runners.ablation import AblationConfig
    from dynheads.tracing.tracer import TraceConfig

    niah = prog.progressive_niah(length, samples, seed, haystack, prompt_style)
    config = AblationConfig(method=method, static_ranking=static_ranking, static_top=static_top,
                            n_boot=n_boot, seed=seed)
    return prog.run_progressive(lm, niah, _ints(ks, "ks"), out, config, TraceConfig(max_new_tokens=max_new_tokens),
                                quiet, runner or _runner(), score)


def check_ablate_progressive(length: int = 2000, ks=(0,), samples: int = 20, method: str = "zero",
                             haystack: str | None = None, static_ranking: str | None = None, out=None,
                             prompt_style: str = "auto", score: str | None = None, **_):
    k_values = _ints(ks, "ks")
    if min(k_values) < 0:  # k above the head count fails once the model is known
        raise ConfigError(f"k = {min(k_values)} must not be negative")
    check_niah((length,), (0.0,), samples, haystack, None, out, prompt_style=prompt_style, score=score)
    check_ranking(static_ranking)
    from dynheads.runners.ablation import AblationConfig  # imports torch: after the cheap checks

    AblationConfig(method=method)


commands.register("ablate-progressive")(Command(check_ablate_progressive, run_ablate_progressive))


# --- multi-hop QA and Dynamic RAG ------------------------------------------------------------
def run_multihop(lm, out, *, data: str, limit: int | None = 100, format: str = "auto", prompt: str = "short",
                 max_new_tokens: int = 32, prompt_style: str = "auto", score: str | None = None, quiet: bool = False,
                 runner=None):
    """Trace multi-hop QA (the `multihop` command); `score`: a registered head score (default: the task's, Eq. 2)."""
    from dynheads.runners.trace import run_multihop as trace_multihop
    from dynheads.tracing.tracer import TraceConfig

    return trace_multihop(lm, data, limit, out, TraceConfig(max_new_tokens=max_new_tokens), format, quiet, prompt,
                          runner or _runner(), prompt_style, score)


def check_multihop(data: str | None = None, limit: int | None = 100, format: str = "auto", prompt: str = "short",
                   prompt_style: str = "auto", score: str | None = None, out=None, **_):
    from dynheads.tasks.multihop import MultihopConfig  # torch-free: errors come at once

    if data is None:
        raise ConfigError("multihop needs 'data' (a multi-hop QA file)")
    check_task("multihop", MultihopConfig(str(data), limit, format, prompt, prompt_style), out, score)


commands.register("multihop")(Command(check_multihop, run_multihop))


def rag_settings(data, limit=100, heads=("dynamic", "static", "dynamic-random", "fixed-random", "none"),
                 retrieval="in-context", corpus=None, format="auto", prompt="cot", max_new_tokens=100,
                 max_sentence_tokens=40, rind_threshold=1.2, top_k=10, window=64, n_heads=5, seed=0,
                 prompt_style="auto", **_):
    """The Dynamic RAG settings of the `rag` command's flags."""
    from dynheads.runners import rag as rag_exp
    from dynheads.rag.loop import RagConfig
    from dynheads.rag.retrievers import HeadWindowRetriever
    from dynheads.rag.trigger import RindTrigger

    names = tuple(dict.fromkeys(h.strip() for h in _strings(heads) if h.strip()))
    return rag_exp.RagSettings(
        _rag_questions(data, limit, format, prompt, prompt_style), names, retrieval, corpus, n_heads, seed=seed,
        loop=RagConfig(max_new_tokens=max_new_tokens, max_sentence_tokens=max_sentence_tokens),
        trigger=RindTrigger(threshold=rind_threshold), windows=HeadWindowRetriever(k=top_k, window=window))


def run_rag(lm, out, *, data: str, limit: int | None = 100,
            heads=("dynamic", "static", "dynamic-random", "fixed-random", "none"), static_ranking: str | None = None,
            regressor: str | None = None, retrieval: str = "in-context", corpus: str | None = None,
            format: str = "auto", prompt: str = "cot", max_new_tokens: int = 100, max_sentence_tokens: int = 40,
            rind_threshold: float = 1.2, top_k: int = 10, window: int = 64, n_heads: int = 5, seed: int = 0,
            prompt_style: str = "auto", quiet: bool = False, runner=None, inputs=None):
    """Dynamic RAG over head strategies (the `rag` command); `inputs`: check_rag's result when already made."""
    from dynheads.runners import rag as rag_exp

    settings = rag_settings(data, limit, heads, retrieval, corpus, format, prompt, max_new_tokens,
                            max_sentence_tokens, rind_threshold, top_k, window, n_heads, seed, prompt_style)
    return rag_exp.run_rag(lm, settings, out, static_ranking, regressor, quiet, inputs, runner or _runner())


def check_rag(data: str | None = None, **params):
    """Strategies, questions and corpus, before the model loads; returns the validated inputs."""
    if data is None:
        raise ConfigError("rag needs 'data' (a multi-hop QA file)")
    from dynheads.tasks.multihop import load_questions  # torch-free: a bad file fails at once

    known = {k: params[k] for k in ("limit", "format", "prompt", "prompt_style") if k in params}
    loaded = load_questions(_rag_questions(data, **known))
    from dynheads.runners import rag as rag_exp

    return rag_exp.check_inputs(rag_settings(data, **params), loaded)


def _rag_questions(data, limit=100, format="auto", prompt="cot", prompt_style="auto"):
    """The `rag` command's question file settings (its defaults: chain-of-thought prompt, 100 questions)."""
    from dynheads.tasks.multihop import MultihopConfig

    return MultihopConfig(str(data), limit, format, prompt, prompt_style)


commands.register("rag")(Command(check_rag, run_rag))


def check_ranking(path) -> None:
    """A given static ranking must exist (whether it fits the model is checked once the model is loaded)."""
    from pathlib import Path

    if path is not None and not Path(path).expanduser().exists():
        raise ConfigError(f"static ranking {path} does not exist (give a head_score JSON or a traced run folder)")


# --- flag values from the CLI (comma-separated text) or a SPEC (TOML lists) ----------------------
def parse_list(text: str, name: str, cast=int) -> tuple:
    """Comma-separated values of one type for flag --name; a one-line ConfigError otherwise."""
    try:
        values = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} expects comma-separated {cast.__name__} values, got '{text}'") from None
    if not values:
        raise ConfigError(f"--{name} is empty")
    return values


def _strings(value) -> tuple[str, ...]:
    return tuple(value.split(",")) if isinstance(value, str) else tuple(str(v) for v in value)


def _values(value, name: str, cast) -> tuple:
    if isinstance(value, str):
        return parse_list(value, name, cast)
    try:
        return tuple(cast(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    except (TypeError, ValueError):
        raise ConfigError(f"'{name}' expects {cast.__name__} values, got {value!r}") from None


def _ints(value, name: str) -> tuple[int, ...]:
    return _values(value, name, int)


def _floats(value, name: str) -> tuple[float, ...]:
    return _values(value, name, float)
