"""dynheads: which attention heads copy from the context, token by token.

Public Python API (the CLI is a thin layer over these):
  load_model(source)                  default | local folder | cached Hub id | .gguf  → LoadedModel
  Tracer(lm, TraceConfig)             prefill once, generate / fork / intervene per step
  trace_generation(model, tok, prompt, needle=...)   one call → (Trace, record arrays)
  NiahConfig, niah_samples            the NIAH task; run_niah(lm, cfg, out) traces a sweep into a run folder
  RunDir, load_records                run folders and their per-step records
  Sparsity                            head-sparse decoding: Tracer.generate(state, heads=policy, sparsity=...)
  dynamism                            Table 1 statistics (analyses.dynamism)

Names are imported on first use (PEP 562), so `import dynheads` and the CLI's --help, `list` and
bad-input errors do not pay for importing torch and transformers.
"""
from __future__ import annotations

import importlib

from dynheads.errors import ConfigError, DataError, DynheadsError, ModelError

_LAZY = {
    "dynamism": "dynheads.analyses.dynamism",
    "run_niah": "dynheads.runners.trace",
    "HeadLayout": "dynheads.heads",
    "LoadedModel": "dynheads.models",
    "load_model": "dynheads.models",
    "Records": "dynheads.records",
    "load_records": "dynheads.records",
    "RunDir": "dynheads.runs",
    "NiahConfig": "dynheads.tasks.niah",
    "niah_samples": "dynheads.tasks.niah",
    "Sparsity": "dynheads.tracing.sparse",
    "Trace": "dynheads.tracing.tracer",
    "TraceConfig": "dynheads.tracing.tracer",
    "Tracer": "dynheads.tracing.tracer",
    "trace_generation": "dynheads.tracing.tracer",
}

__all__ = ["ConfigError", "DataError", "DynheadsError", "ModelError", *_LAZY]


def __getattr__(name: str):
    """Import a public name's module on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'dynheads' has no attribute '{name}'")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
