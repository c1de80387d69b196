"""Static retrieval-head rankings [layers, heads] from a *separate* detection run (paper §1.2).

A ranking comes from a Retrieval_Head-style head_score JSON (mean score per head, as written by
`dynheads dynamism` into results/head_scores.json) or from a traced run folder (each head's
activation frequency under that run's score). It must not be computed on the samples it is used
on: a run folder with the same NIAH seed, haystack and any shared sample id is refused. Without a
ranking, `load_static_ranking` traces a detection pass (the caller's grid with another seed) first.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dynheads.errors import ConfigError, DataError
from dynheads.experiments.dynamism import activation_frequency, load_head_scores
from dynheads.heads import HeadLayout
from dynheads.models import LoadedModel
from dynheads.runs import RunDir
from dynheads.tasks.niah import NiahConfig
from dynheads.tracing.tracer import TraceConfig

_KEY = re.compile(r"^L?(\d+)-H?(\d+)$")


def load_static_ranking(path: str | None, lm: LoadedModel, niah: NiahConfig, sample_ids: set[str],
                        detection: NiahConfig, detection_out: Path, trace: TraceConfig = TraceConfig(),
                        quiet: bool = False, runner=None) -> tuple[np.ndarray, dict]:
    """(ranking [L, H], a description of its source) from `path`, or from a fresh detection pass.

    `runner` drives the detection pass's samples (default: one after another in this process).
    """
    if path is None:
        if niah.needles:
            raise ConfigError("give --static-ranking when using a needle file (a detection pass would reuse its needles)")
        from dynheads.experiments.trace import run_niah

        extra = {} if runner is None else {"runner": runner}
        run_niah(lm, detection, detection_out, TraceConfig(max_new_tokens=trace.max_new_tokens), quiet, **extra)
        path = str(detection_out)
    p = Path(path).expanduser()
    if p.is_dir():
        return ranking_from_run(RunDir.open(p), lm.layout, niah, sample_ids)
    if not p.is_file():
        raise ConfigError(f"static ranking {p} does not exist (give a head_score JSON, a DuoAttention .tsv "
                          "or a traced run folder)")
    if p.suffix.lower() == ".tsv":  # DuoAttention full_attention_heads.tsv (experiments/head_export.py)
        from dynheads.experiments.head_export import ranking_from_duo_tsv

        return ranking_from_duo_tsv(p, lm.layout), {"kind": "duo_tsv", "path": str(p)}
    return ranking_from_head_scores(p, lm.layout), {"kind": "head_scores", "path": str(p)}


def ranking_from_head_scores(path: Path, layout: HeadLayout) -> np.ndarray:
    """Mean score per head from a head_score JSON whose heads span exactly the model's layers × heads."""
    ranking = load_head_scores(path, layout)  # rejects heads outside the model
    keys = [_KEY.match(k.strip()) for k in json.loads(Path(path).read_text())]
    n_layers = max(int(m.group(1)) for m in keys) + 1 if keys else 0
    n_heads = max(int(m.group(2)) for m in keys) + 1 if keys else 0
    if (n_layers, n_heads) != layout.shape:
        raise ConfigError(f"static ranking {path} covers {n_layers} layers × {n_heads} heads; "
                          f"the model has {layout.n_layers} × {layout.n_heads}")
    return ranking


def ranking_from_run(run: RunDir, layout: HeadLayout, niah: NiahConfig, sample_ids: set[str],
                     what: str = "static ranking") -> tuple[np.ndarray, dict]:
    """Activation frequency of every head in a traced run that shares no sample with this one.

    `what` names the run in messages (`sparse` reads its --detection run through here)."""
    from dynheads.scores.base import get_score

    cfg = run.config
    if "score" not in cfg or "layout" not in cfg:
        raise ConfigError(f"{what} {run.path} is not a traced detection run (no score in its config)")
    theirs = cfg["layout"]
    if (theirs["n_layers"], theirs["n_heads"]) != layout.shape:
        raise ConfigError(f"{what} {run.path} has {theirs['n_layers']} layers × {theirs['n_heads']} heads; "
                          f"the model has {layout.n_layers} × {layout.n_heads}")
    task = cfg.get("task", {})
    same_source = (cfg.get("kind") == "niah" and task.get("seed") == niah.seed
                   and task.get("haystack") == niah.haystack and task.get("needles") == niah.needles)
    shared = sorted(run.done_samples() & sample_ids) if same_source else []
    if shared:
        raise ConfigError(f"{what} {run.path} was detected on the same samples ({shared[0]}, seed {niah.seed}); "
                          "use a detection run with another --seed")
    try:
        records = run.read_records()
    except DataError:
        raise ConfigError(f"{what} {run.path} has no finished samples") from None
    active = get_score(cfg["score"]["name"]).active(records.array("score"))
    return activation_frequency(active), {"kind": "run", "path": str(run.path), "n_samples": len(records.samples()),
                                          "n_steps": int(len(active)), "seed": task.get("seed")}
