"""`dynheads sparse`: head-sparse decoding under head policies at equal budgets, on NIAH or multi-hop QA."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynheads.cli.trace import PROMPT_STYLE, parse_ints, parse_list
from dynheads.headsets.in_step import DEFAULT_REFINE


def register(app: typer.Typer) -> None:
    @app.command()
    def sparse(
        model: str = typer.Option("default", help="'default', a local HF folder, a cached Hub id or a .gguf file"),
        policies: str = typer.Option("full,streaming,static,random,oracle,predicted",
                                     help="head policies: full, streaming, static, random, oracle, predicted, query (decides inside "
                                          "the step from Quest page bounds; threshold calibrated on --detection), "
                                          "layerwise (static set up to --probe-layer, above it a probe on the "
                                          "step's own residual stream, fitted on --detection)"),
        budgets: str = typer.Option("1,2,4,8,16", help="heads (units) opened per step, over all layers"),
        detection: Path = typer.Option(..., help="traced run folder of OTHER samples (`dynheads niah`/`multihop`): "
                                       "static ranking and the predicted policy's training data"),
        static_ranking: Optional[str] = typer.Option(None, help="head_score JSON, DuoAttention .tsv or run "
                                                     "folder overriding the detection run's static ranking"),
        sink: int = typer.Option(16, min=0, help="first keys a closed head reads (DuoAttention deploys 64)"),
        recent: int = typer.Option(64, min=1, help="last keys a closed head reads, the new token included "
                                   "(DuoAttention: 256)"),
        unit: str = typer.Option("kv", help="what a policy opens: kv (a GQA group) or query (one query head)"),
        lengths: str = typer.Option("1000,2000", help="NIAH: whole-prompt lengths in tokens"),
        depths: str = typer.Option("0,25,50,75,100", help="NIAH: needle depths in percent"),
        samples_per_cell: int = typer.Option(2, min=1, help="NIAH: samples per (length, depth) cell"),
        haystack: Optional[str] = typer.Option(None, help="NIAH: folder of .txt files (default: CPython docs prose)"),
        needles: Optional[str] = typer.Option(None, help="NIAH: Retrieval_Head-style needle JSONL (default: UUID)"),
        num_needles: int = typer.Option(1, help="NIAH: needles per prompt (RULER-style multi-needle when ≥ 2)"),
        mode: Optional[str] = typer.Option(None, help="NIAH with --num-needles ≥ 2: multikey (default) or multivalue"),
        data: Optional[Path] = typer.Option(None, help="multi-hop QA file instead of NIAH (as `dynheads multihop`)"),
        limit: Optional[int] = typer.Option(100, min=1, help="multi-hop: samples"),
        max_new_tokens: int = typer.Option(48, min=1),
        probe_layer: Optional[int] = typer.Option(None, min=0, help="layerwise: the probe reads the residual "
                                                  "stream after this layer (default: a quarter of the layers deep)"),
        query_refine: int = typer.Option(DEFAULT_REFINE, min=0, help="query: pages (of 16 keys) whose keys each query head "
                                         "reads to refine its pull; 0: Quest's page bound alone (cheapest)"),
        n_boot: int = typer.Option(2000, min=1, help="bootstrap resamples over samples"),
        seed: int = typer.Option(0),
        prompt_style: str = PROMPT_STYLE,
        dtype: str = typer.Option("float32"),
        device: str = typer.Option("cpu"),
        out: Path = typer.Option(..., help="run folder (resumes when it exists with the same config)"),
        quiet: bool = typer.Option(False),
    ):
        """Head-sparse decoding: accuracy and KV read of each head policy at equal budget (predicted vs static)."""
        from dynheads.commands import check_task, niah_config
        from dynheads.errors import ConfigError
        from dynheads.runs import RunDir
        from dynheads.tasks.base import check_prompt_style, get_task
        from dynheads.tasks.multihop import MultihopConfig

        # every value that needs no model, before torch is imported and before the run folder exists
        check_prompt_style(prompt_style)
        budget_values = parse_ints(budgets, "budgets")
        if min(budget_values) < 1:
            raise ConfigError(f"--budgets: a budget of {min(budget_values)} opens no head (that is the 'streaming' "
                              "policy); give budgets of at least 1")
        det = RunDir.open(detection, what="detection run")
        if "score" not in det.config or not det.done_samples():
            raise ConfigError(f"detection run {detection} is not a traced run with finished samples (give a folder "
                              "of `dynheads niah` or `dynheads multihop` on other samples)")
        task = get_task("niah" if data is None else "multihop")  # --data names a multi-hop file
        task_config = (niah_config(lengths, depths, samples_per_cell, haystack, needles, seed, num_needles, mode,
                                   prompt_style) if data is None
                       else MultihopConfig(str(data), limit, prompt_style=prompt_style))
        check_task(task.name, task_config, out)
        from dynheads.runners.sparse import SparseConfig
        from dynheads.tracing.sparse import Sparsity

        config = SparseConfig(str(detection), parse_list(policies, "policies", str), budget_values,
                              Sparsity(sink, recent, unit), static_ranking, n_boot, seed, probe_layer,
                              query_refine)
        from dynheads.models import load_model
        from dynheads.report.sparse_figures import sparse_table
        from dynheads.runners.sparse import run_sparse
        from dynheads.runners.trace import with_prompt_style
        from dynheads.tracing.tracer import TraceConfig

        task_config = task.inputs(task_config)[0]  # resolved paths, as the detection run stores them
        lm = load_model(model, dtype=dtype, device=device)
        task_config, trace = with_prompt_style(lm, task_config, TraceConfig(max_new_tokens=max_new_tokens))
        samples = list(task.samples(lm.tokenizer, task_config, lm.max_positions))
        run, result = run_sparse(lm, samples, task_config, config, out, task.metric, trace, quiet)
        typer.echo(sparse_table(result))
        typer.echo(f"figure: {run.figure_path('sparse_accuracy_vs_kv')}")
        typer.echo(str(run.path))
