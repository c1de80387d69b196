"""Commands that need the model for multi-hop QA: `multihop` (trace, Eq. 2) and `rag` (Dynamic RAG, Table 4)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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
        dtype: str = typer.Option("float32"),
        device: str = typer.Option("cpu"),
        out: Path = typer.Option(..., help="run folder (resumes when it exists with the same config)"),
        quiet: bool = typer.Option(False),
    ):
        """Trace multi-hop QA: per-step Eq. 2 reasoning retrieval scores on the supporting facts, EM/F1."""
        from dynheads.experiments.trace import MultihopConfig, format_fig6_table, load_questions, run_multihop
        from dynheads.models import load_model
        from dynheads.runs import check_out
        from dynheads.tracing.tracer import TraceConfig

        load_questions(MultihopConfig(str(data), limit, format, prompt))  # bad input fails before the model loads
        check_out(out)
        lm = load_model(model, dtype=dtype, device=device)
        run = run_multihop(lm, data, limit, out, TraceConfig(max_new_tokens=max_new_tokens), format, quiet, prompt)
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
        regressor: Optional[str] = typer.Option(None, help="saved probe .pt (with its .pt.json; experiments.probes.Probe) "
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
        dtype: str = typer.Option("float32"),
        device: str = typer.Option("cpu"),
        out: Path = typer.Option(..., help="run folder (resumes per question with the same config)"),
        quiet: bool = typer.Option(False),
    ):
        """Dynamic RAG (Table 4): RIND decides when, the chosen heads decide which context to open."""
        from dynheads.experiments import rag as rag_exp
        from dynheads.experiments.trace import MultihopConfig
        from dynheads.models import load_model
        from dynheads.rag.loop import RagConfig
        from dynheads.rag.retrievers import HeadWindowRetriever
        from dynheads.rag.trigger import RindTrigger
        from dynheads.runs import check_out

        names = tuple(dict.fromkeys(h.strip() for h in heads.split(",") if h.strip()))
        settings = rag_exp.RagSettings(
            MultihopConfig(str(data), limit, format, prompt), names, retrieval, corpus, n_heads, seed=seed,
            loop=RagConfig(max_new_tokens=max_new_tokens, max_sentence_tokens=max_sentence_tokens),
            trigger=RindTrigger(threshold=rind_threshold), windows=HeadWindowRetriever(k=top_k, window=window))
        inputs = rag_exp.check_inputs(settings)
        check_out(out)
        n_docs = getattr(getattr(inputs[1], "retriever", None), "n_docs", None)
        if n_docs is not None:
            typer.echo(f"corpus {corpus}: {n_docs} documents indexed")
        lm = load_model(model, dtype=dtype, device=device)
        run = rag_exp.run_rag(lm, settings, out, static_ranking, regressor, quiet, inputs)
        typer.echo(rag_exp.format_rag_table(run.read_result("rag"), Path(run.config["model"]["source"]).name))
        typer.echo(str(run.path))
