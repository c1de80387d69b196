"""dynheads: which attention heads copy from the context, token by token.

Public Python API (the CLI is a thin layer over these):
  load_model(source)                  default | local folder | cached Hub id | .gguf  → LoadedModel
  Tracer(lm, TraceConfig)             prefill once, generate / fork / intervene per step
  trace_generation(model, tok, prompt, needle=...)   one call → (Trace, record arrays)
  NiahConfig, niah_samples            the NIAH task; run_niah(lm, cfg, out) traces a sweep into a run folder
  RunDir, load_records                run folders and their per-step records
  dynamism                            Table 1 statistics (experiments.dynamism)
"""
from dynheads.errors import ConfigError, DataError, DynheadsError, ModelError
from dynheads.experiments import dynamism
from dynheads.experiments.trace import run_niah
from dynheads.heads import HeadLayout
from dynheads.models import LoadedModel, load_model
from dynheads.records import Records, load_records
from dynheads.runs import RunDir
from dynheads.tasks.niah import NiahConfig, niah_samples
from dynheads.tracing.tracer import Trace, TraceConfig, Tracer, trace_generation

__all__ = ["ConfigError", "DataError", "DynheadsError", "ModelError", "dynamism", "run_niah", "HeadLayout",
           "LoadedModel", "load_model", "Records", "load_records", "RunDir", "NiahConfig", "niah_samples",
           "Trace", "TraceConfig", "Tracer", "trace_generation"]
