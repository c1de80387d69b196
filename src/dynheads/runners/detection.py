"""The static ranking an experiment needs: from a given file or run folder, or from a detection pass it traces.

A detection pass is the caller's NIAH grid with another seed (fresh needles), traced into a sub-folder of
the run with the run's head score; its ranking is each head's activation frequency (analyses/rankings.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dynheads.analyses.rankings import ranking_from_head_scores, ranking_from_run
from dynheads.errors import ConfigError
from dynheads.models import LoadedModel
from dynheads.runs import RunDir
from dynheads.tasks.niah import NiahConfig
from dynheads.tracing.tracer import TraceConfig

__all__ = ["load_static_ranking", "ranking_from_head_scores", "ranking_from_run"]


def load_static_ranking(path: str | None, lm: LoadedModel, niah: NiahConfig, sample_ids: set[str],
                        detection: NiahConfig, detection_out: Path, trace: TraceConfig = TraceConfig(),
                        quiet: bool = False, runner=None, score: str | None = None) -> tuple[np.ndarray, dict]:
    """(ranking [L, H], a description of its source) from `path`, or from a fresh detection pass.

    `runner` drives the detection pass's samples (default: one after another in this process); `score`
    is the head score it traces with (default: the NIAH task's).
    """
    if path is None:
        if niah.needles:
            raise ConfigError("give --static-ranking when using a needle file (a detection pass would reuse its needles)")
        from dynheads.runners.trace import run_niah

        extra = {} if runner is None else {"runner": runner}
        run_niah(lm, detection, detection_out, TraceConfig(max_new_tokens=trace.max_new_tokens), quiet, score=score,
                 **extra)
        path = str(detection_out)
    p = Path(path).expanduser()
    if p.is_dir():
        return ranking_from_run(RunDir.open(p), lm.layout, niah, sample_ids)
    if not p.is_file():
        raise ConfigError(f"static ranking {p} does not exist (give a head_score JSON, a DuoAttention .tsv "
                          "or a traced run folder)")
    if p.suffix.lower() == ".tsv":  # DuoAttention full_attention_heads.tsv (analyses/head_export.py)
        from dynheads.analyses.head_export import ranking_from_duo_tsv

        return ranking_from_duo_tsv(p, lm.layout), {"kind": "duo_tsv", "path": str(p)}
    return ranking_from_head_scores(p, lm.layout), {"kind": "head_scores", "path": str(p)}
