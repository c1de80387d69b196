"""Commands that need the model for multi-hop QA: `multihop` (trace, Eq. 2) and `rag` (Dynamic RAG, Table 4)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynheads.cli.trace import DEVICE_MAP, MAX_MEMORY, OFFLOAD_FOLDER, PROMPT_STYLE, SCORE, load_placed


def register(app: typer.Typer) -> None:
    @app.command()
    def multihop(
        model: str = typer.Option("default", help="'default', a local HF folder, a cached Hub id or a .gguf file"),
        data: Path = typer.Option(..., help="HotpotQA / 2Wiki / IRCoT / MuSiQue file (JSON list or JSONL)"),
        limit: Optional[int] = typer.Option(100, min=1,
                                            help="samples to trace (records without their support are skipped)"),
        format: str = typer.Option("auto", help="file layout: auto, hotpotqa, hotpotqa_hf, 2wiki, ircot, musique"),
        prompt: str = typer.Option("short", help="'short' (answer only) or 'cot' (reasoning, as in Dynamic RAG)"),
        max_new_tokens: int = typer.Option(32, min=1),
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
        """Trace multi-hop QA: per-step Eq. 2 reasoning retrieval scores on the supporting facts, EM/F1."""
        from dynheads.commands import check_multihop, run_multihop

        check_multihop(data, limit, format, prompt, prompt_style, score, out)  # bad input fails before the model loads
        lm = load_placed(model, dtype, device, device_map, max_memory, offload_folder)
        from dynheads.runners.trace import format_fig6_table  # torch: only once the input is checked

        run = run_multihop(lm, out, data=data, limit=limit, format=format, prompt=prompt,
                           max_new_tokens=max_new_tokens, prompt_style=prompt_style, score=score, quiet=quiet)
        summary = run.read_result("multihop")
        rep = summary["load_report"]
        typer.echo(f"{summary['n_samples']} samples: EM {summary['em']:.3f}, F1 {summary['f1']:.3f} "
                   f"({rep['n_missing_support']} of {rep['n_records']} records read had supporting facts "
                   f"missing from their context{'; skipped' if rep['skipped_ids'] else ''})")
        typer.echo(format_fig6_table(summary["fig6"]))
        typer.echo(str(run.path))

    @app.command()
    def rag(
        model: str = typer.Option("default", help="'default', a local HF folder, a cached Hub id or a .gguf file"),
        data: Path = typer.Option(..., help="multi-hop QA file (HotpotQA layouts, 2Wiki, IRCoT, MuSiQue)"),
        limit: Optional[int] = typer.Option(100, min=1, help="questions"),
        heads: str = typer.Option("dynamic,static,dynamic-random,fixed-random,none",
                                  help="comma-separated strategies: dynamic, static, dynamic-random, fixed-random, "
                                       "none, full (several share each question's prefill)"),
        static_ranking: Optional[str] = typer.Option(None, help="head_scores JSON or a multihop run folder (other questions)"),
        regressor: Optional[str] = typer.Option(None, help="saved probe .pt (with its .pt.json; analyses.probes.Probe) "
                                                "or a multihop run folder to train the regressor on"),
        retrieval: str = typer.Option("in-context", help="'in-context' (attention masks, paper) or 'corpus' (BM25)"),
        corpus: Optional[str] = typer.Option(None, help="JSONL corpus {id, title, text} for --retrieval corpus"),
        format: str = typer.Option("auto", help="file layout (see `dynheads multihop --help`)"),
        prompt: str = typer.Option("cot", help="'cot' (DRAGIN-style reasoning sentences) or 'short'"),
        max_new_tokens: int = typer.Option(100, min=1, help="answer budget in tokens (DRAGIN HotpotQA: 100)"),
        max_sentence_tokens: int = typer.Option(40, min=1, help="cap on one drafted sentence"),
        rind_threshold: float = typer.Option(1.2, help="RIND θ (DRAGIN HotpotQA config: 1.2), on DRAGIN's scale: "
                                             "entropy × (per head, max attention from a later token; mean over the "
                                             "last layer's heads), rescaled to mean 1 per sentence"),
        top_k: int = typer.Option(10, min=1, help="top-k attended context positions per retrieval"),
        window: int = typer.Option(64, min=1, help="window size in tokens around each cluster representative"),
        n_heads: int = typer.Option(5, min=1, help="heads per retrieval (paper: 5)"),
        seed: int = typer.Option(0, help="seed of the random strategies (per question and strategy)"),
        prompt_style: str = PROMPT_STYLE,
        dtype: str = typer.Option("float32"),
        device: str = typer.Option("cpu"),
        device_map: Optional[str] = DEVICE_MAP,
        max_memory: Optional[str] = MAX_MEMORY,
        offload_folder: Optional[str] = OFFLOAD_FOLDER,
        out: Path = typer.Option(..., help="run folder (resumes per question with the same config)"),
        quiet: bool = typer.Option(False),
    ):
        """Dynamic RAG (Table 4): RIND decides when, the chosen heads decide which context to open."""
        from dynheads.commands import check_rag, run_rag
        from dynheads.runs import check_out

        params = dict(data=data, limit=limit, heads=heads, static_ranking=static_ranking, regressor=regressor,
                      retrieval=retrieval, corpus=corpus, format=format, prompt=prompt, max_new_tokens=max_new_tokens,
                      max_sentence_tokens=max_sentence_tokens, rind_threshold=rind_threshold, top_k=top_k,
                      window=window, n_heads=n_heads, seed=seed, prompt_style=prompt_style)
        inputs = check_rag(**params)
        check_out(out)
        n_docs = getattr(getattr(inputs[1], "retriever", None), "n_docs", None)
        if n_docs is not None:
            typer.echo(f"corpus {corpus}: {n_docs} documents indexed")
        lm = load_placed(model, dtype, device, device_map, max_memory, offload_folder)
        run = run_rag(lm, out, quiet=quiet, inputs=inputs, **params)
        from dynheads.runners import rag as rag_exp

        typer.echo(rag_exp.format_rag_table(run.read_result("rag"), Path(run.config["model"]["source"]).name))
        typer.echo(str(run.path))
