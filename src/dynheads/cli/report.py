"""Commands that run everything and show it: `reproduce` (all experiments + report), `report`, `view`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dynheads.cli.trace import PROMPT_STYLE, parse_floats, parse_ints, parse_list


def register(app: typer.Typer) -> None:
    @app.command()
    def reproduce(
        model: str = typer.Option("default", help="'default', a local HF folder, a cached Hub id or a .gguf file"),
        preset: str = typer.Option("smoke", help="smoke (this 2-core machine, ~30 min) | paper (the paper's grids)"),
        out: Path = typer.Option(..., help="output folder: one sub-folder per experiment, report.html, report.md"),
        niah_lengths: Optional[str] = typer.Option(None, help="override: NIAH lengths of claims 1 and 3"),
        niah_per_cell: Optional[int] = typer.Option(None, help="override: NIAH samples per cell (claims 1, 3)"),
        ablation_lengths: Optional[str] = typer.Option(None, help="override: ablation grid lengths (claim 2)"),
        ablation_depths: Optional[str] = typer.Option(None, help="override: ablation grid depths (claim 2)"),
        ablation_per_cell: Optional[int] = typer.Option(None, help="override: ablation samples per cell"),
        progressive_samples: Optional[int] = typer.Option(None, help="override: progressive ablation samples"),
        progressive_ks: Optional[str] = typer.Option(None, help="override: progressive ablation k values"),
        probe_offsets: Optional[str] = typer.Option(None, help="override: probe offsets k"),
        hotpotqa: Optional[str] = typer.Option(None, help="HotpotQA JSON list (multihop + Dynamic RAG)"),
        multihop_questions: Optional[int] = typer.Option(None, help="override: detection questions"),
        rag_questions: Optional[int] = typer.Option(None, help="override: evaluated questions (Table 4)"),
        prompt_style: str = PROMPT_STYLE,
        only: Optional[str] = typer.Option(None, "--steps", help="run only these steps (comma-separated: niah, "
                                           "dynamism, cca, probe_k<k>, ablation, progressive, multihop, "
                                           "probe_regress_k0, rag); the others stay pending"),
    ):
        """Run every experiment of the paper into OUT (resumable), then write report.html and report.md."""
        from dynheads.experiments import reproduce as rep
        from dynheads.tasks.base import check_prompt_style

        check_prompt_style(prompt_style)
        base = rep.preset(preset)
        sizes = rep.preset(
            preset, niah_lengths=_ints(niah_lengths, "niah-lengths"), niah_per_cell=niah_per_cell,
            ablation_lengths=_ints(ablation_lengths, "ablation-lengths"),
            ablation_depths=parse_floats(ablation_depths, "ablation-depths") if ablation_depths else None,
            ablation_per_cell=ablation_per_cell, progressive_samples=progressive_samples,
            progressive_ks=_ints(progressive_ks, "progressive-ks"), probe_offsets=_ints(probe_offsets, "probe-offsets"),
            hotpotqa=hotpotqa, prompt_style=prompt_style,
            multihop_records=(base.multihop_records[0], base.multihop_records[0] + multihop_questions)
            if multihop_questions else None,
            rag_records=(base.rag_records[0], base.rag_records[0] + rag_questions) if rag_questions else None)
        rep.reproduce(model, sizes, out, preset, log=lambda m: print(m, file=sys.stderr),
                      only=parse_list(only, "steps", str) if only else None)
        _build_report(out)

    @app.command()
    def report(
        runs: list[Path] = typer.Argument(..., help="a folder written by `dynheads reproduce`, or several to compare"),
        out: Optional[Path] = typer.Option(None, help="with several folders: where the comparison's report.html "
                                           "and report.md go"),
    ):
        """Rebuild report.html and report.md of a reproduction, or compare several models' reproductions side by
        side (no model needed)."""
        from dynheads.errors import ConfigError
        from dynheads.experiments.reproduce import read_state

        for run in runs:
            read_state(run)  # a folder without a readable reproduce.json fails here, before the report's imports
        if len(runs) == 1 and out is None:
            _build_report(runs[0])
            return

        if len(runs) < 2 or out is None:
            raise ConfigError("compare several reproductions: dynheads report RUN_A RUN_B … --out DIR")
        from dynheads.report.compare import build_comparison

        html, md, verdicts = build_comparison(runs, out)
        for name, vs in verdicts.items():
            for v in vs:
                typer.echo(f"{name} — {v.claim}: {v.verdict} — {v.reason}")
        typer.echo(str(md))
        typer.echo(str(html))

    @app.command()
    def view(
        run_dir: Path = typer.Argument(..., help="a run folder (niah, multihop, ablate, ablate-progressive, rag)"),
        sample: Optional[str] = typer.Option(None, help="sample id (default: the first finished sample)"),
        out: Path = typer.Option(..., help="the HTML file to write"),
    ):
        """Write a self-contained per-token head viewer of one sample of a traced run."""
        from dynheads.report.view import write_view

        path = write_view(run_dir, sample, out)
        typer.echo(f"{path} ({path.stat().st_size / 1e6:.2f} MB)")


def _ints(text: Optional[str], name: str):
    return parse_ints(text, name) if text else None


def _build_report(out: Path) -> None:
    from dynheads.report.html import build_report

    html, md, verdicts = build_report(out)
    for v in verdicts:
        typer.echo(f"{v.claim}: {v.verdict} — {v.reason}")
    typer.echo(str(md))
    typer.echo(str(html))
