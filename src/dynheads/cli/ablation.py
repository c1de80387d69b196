"""Commands that ablate heads while generating: the per-step grid (`ablate`) and `ablate-progressive`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynheads.cli.trace import DEVICE_MAP, MAX_MEMORY, OFFLOAD_FOLDER, PROMPT_STYLE, load_placed

SCORE = typer.Option(None, help="head score that defines D_t, the step's dynamic heads (`dynheads list scores`; "
                     "default: copy_paste, Eq. 1 on the needle)")

_RANKING = "head_score JSON (e.g. results/head_scores.json of `dynheads dynamism`) or a traced run folder " \
           "from OTHER samples; default: a detection pass with seed + 1 in <out>/detection"


def register(app: typer.Typer) -> None:
    @app.command()
    def ablate(
        model: str = typer.Option("default", help="'default', a local HF folder, a cached Hub id or a .gguf file"),
        lengths: str = typer.Option("1000,2000,4000", help="whole-prompt lengths in tokens"),
        depths: str = typer.Option("0,25,50,75,100", help="needle depths in percent"),
        samples_per_cell: int = typer.Option(3, min=1, help="samples per (length, depth) cell"),
        static_ranking: Optional[str] = typer.Option(None, help=_RANKING),
        method: str = typer.Option("zero", help="ablation method: zero | uniform (Wu et al.'s mean-value)"),
        match: str = typer.Option("average", help="baseline head count: average (mean heads the dynamic condition "
                                  "masked per step) | unmasked (mean |D_t| of the unmasked runs) | step (each step's "
                                  "|D_t|); average/unmasked: rounded half up, at least 1 if any head was counted"),
        match_scope: str = typer.Option("run", help="average over: run (every step of every sample, as the paper; "
                                        "a first pass into <out>/first_pass, one extra prefill per sample) | sample "
                                        "(each sample's own steps; one pass)"),
        random_per_step: bool = typer.Option(False, help="redraw the random heads at every step"),
        haystack: Optional[str] = typer.Option(None, help="folder of .txt files (default: CPython docs prose)"),
        max_new_tokens: int = typer.Option(48, min=1),
        n_boot: int = typer.Option(2000, min=1, help="bootstrap resamples over samples"),
        seed: int = typer.Option(0),
        score: Optional[str] = SCORE,
        prompt_style: str = PROMPT_STYLE,
        dtype: str = typer.Option("float32"),
        device: str = typer.Option("cpu"),
        device_map: Optional[str] = DEVICE_MAP,
        max_memory: Optional[str] = MAX_MEMORY,
        offload_folder: Optional[str] = OFFLOAD_FOLDER,
        out: Path = typer.Option(..., help="run folder (resumes when it exists with the same config)"),
        quiet: bool = typer.Option(False),
    ):
        """Per-step ablation (Fig. 2): mask dynamic, static, static-excluding-dynamic or random heads."""
        from dynheads.commands import check_ablate, run_ablate

        check_ablate(lengths, depths, samples_per_cell, method, match, haystack, static_ranking, out,
                     prompt_style=prompt_style, score=score)  # before the model
        from dynheads.report.ablation_figures import ablation_table

        lm = load_placed(model, dtype, device, device_map, max_memory, offload_folder)
        run, result = run_ablate(lm, out, lengths=lengths, depths=depths, samples_per_cell=samples_per_cell,
                                 static_ranking=static_ranking, method=method, match=match, match_scope=match_scope,
                                 random_per_step=random_per_step, haystack=haystack, max_new_tokens=max_new_tokens,
                                 n_boot=n_boot, seed=seed, prompt_style=prompt_style, score=score, quiet=quiet)
        typer.echo(ablation_table(result))
        typer.echo(f"figure: {run.figure_path('ablation_heatmaps')}")
        typer.echo(str(run.path))

    @app.command("ablate-progressive")
    def ablate_progressive(
        model: str = typer.Option("default", help="'default', a local HF folder, a cached Hub id or a .gguf file"),
        length: int = typer.Option(2000, min=1, help="whole-prompt length in tokens (paper: 5000)"),
        ks: str = typer.Option("0,5,10,15,20,25,30,35,40,45,50,55,60,65,70", help="heads masked per step"),
        samples: int = typer.Option(20, min=1, help="samples (one per depth, evenly spaced over 0-100%)"),
        static_ranking: Optional[str] = typer.Option(None, help=_RANKING),
        static_top: int = typer.Option(20, min=1, help="static set of the compensation metric (paper: top-20)"),
        method: str = typer.Option("zero", help="ablation method: zero | uniform"),
        haystack: Optional[str] = typer.Option(None, help="folder of .txt files (default: CPython docs prose)"),
        max_new_tokens: int = typer.Option(48, min=1),
        n_boot: int = typer.Option(2000, min=1, help="bootstrap resamples over samples"),
        seed: int = typer.Option(0),
        score: Optional[str] = SCORE,
        prompt_style: str = PROMPT_STYLE,
        dtype: str = typer.Option("float32"),
        device: str = typer.Option("cpu"),
        device_map: Optional[str] = DEVICE_MAP,
        max_memory: Optional[str] = MAX_MEMORY,
        offload_folder: Optional[str] = OFFLOAD_FOLDER,
        out: Path = typer.Option(..., help="run folder (resumes when it exists with the same config)"),
        quiet: bool = typer.Option(False),
    ):
        """Progressive ablation (Fig. 3): k heads per step, accuracy and compensation by static heads."""
        from dynheads.commands import check_ablate_progressive, run_ablate_progressive

        check_ablate_progressive(length, ks, samples, method, haystack, static_ranking, out,
                                 prompt_style=prompt_style, score=score)  # before the model
        from dynheads.report.ablation_figures import progressive_table

        lm = load_placed(model, dtype, device, device_map, max_memory, offload_folder)
        run, result = run_ablate_progressive(lm, out, length=length, ks=ks, samples=samples,
                                             static_ranking=static_ranking, static_top=static_top, method=method,
                                             haystack=haystack, max_new_tokens=max_new_tokens, n_boot=n_boot,
                                             seed=seed, prompt_style=prompt_style, score=score, quiet=quiet)
        typer.echo(progressive_table(result))
        typer.echo(f"figure: {run.figure_path('ablation_progressive')}")
        typer.echo(str(run.path))
