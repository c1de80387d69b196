"""Dynamic RAG comparison of head strategies (paper Sec. 5, Table 4) on multi-hop QA.

Every question is prefilled once (system prompt + context) and each strategy forks that prefill
(`rag.loop.prepare`). A strategy is a head set (headsets/: `--heads` names in names.py) choosing
`--n-heads` query heads at each identification step, built afresh per question with a generator seeded
from (seed, question id, strategy); the resume unit is the question (all its strategies). Per strategy the run keeps
EM/F1 of the extracted answer, the retrievals (flagged token, heads, opened windows or passages) and
the fraction of supporting-fact tokens the windows opened. results/rag.json has EM/F1 with 95%
bootstrap CIs over questions and paired tests of every strategy against `static` (stats module).
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dynheads.analyses.probes import Probe, ProbeConfig, fit_probe
from dynheads.analyses.stats import bootstrap_ci, paired_difference
from dynheads.config import run_config
from dynheads.errors import ConfigError, DataError
from dynheads.files import fingerprint, resolved
from dynheads.heads import HeadLayout
from dynheads.headsets.base import build
from dynheads.headsets.names import RAG
from dynheads.models import LoadedModel
from dynheads.rag import loop
from dynheads.rag.modes import N_PASSAGES, retrieval_modes
from dynheads.rag.retrievers import QUERY_WORDS, HeadWindowRetriever
from dynheads.rag.trigger import RindTrigger
from dynheads.runs import RunDir
from dynheads.tasks.base import encode, get_task, resolve_prompt_style
from dynheads.tasks.multihop import MultihopConfig, load_questions
from dynheads.tracing.runner import Runner, run_samples
from dynheads.tracing.tracer import TraceConfig, Tracer

# Paper Table 4 (HotpotQA, EM / F1). No "full context" row exists in the paper.
PAPER_TABLE4 = {
    "llama3.1-8b": {"dynamic": (0.456, 0.5586), "static": (0.398, 0.5098), "dynamic-random": (0.272, 0.3670),
                    "fixed-random": (0.272, 0.3763), "none": (0.252, 0.3257)},
    "llama3.2-3b": {"dynamic": (0.384, 0.4993), "static": (0.428, 0.5386), "dynamic-random": (0.224, 0.3143),
                    "fixed-random": (0.226, 0.3051), "none": (0.184, 0.2439)},
    "qwen3-8b": {"dynamic": (0.286, 0.3580), "static": (0.278, 0.3429), "dynamic-random": (0.210, 0.2804),
                 "fixed-random": (0.210, 0.2804), "none": (0.220, 0.2961)},
    "llama2-13b": {"dynamic": (0.284, 0.3838), "static": (0.278, 0.3789), "dynamic-random": (0.276, 0.3762),
                   "fixed-random": (0.272, 0.3751), "none": (0.192, 0.2750)},
    "phi4-mini": {"dynamic": (0.202, 0.2690), "static": (0.186, 0.2505), "dynamic-random": (0.082, 0.1090),
                  "fixed-random": (0.086, 0.1111), "none": (0.172, 0.2331)},
}
COLUMNS = ("dynamic", "static", "dynamic-random", "fixed-random", "none", "full")
TITLES = {"dynamic": "Dynamic", "static": "Static", "dynamic-random": "Dyn. Random", "fixed-random": "Fixed Random",
          "none": "w/o RAG", "full": "Full ctx"}


@dataclass(frozen=True)
class RagSettings:
    """One Dynamic RAG run; fields the paper leaves open say so."""

    task: MultihopConfig
    strategies: tuple[str, ...] = ("dynamic", "static", "dynamic-random", "fixed-random", "none")
    retrieval: str = "in-context"  # paper: in-context (attention masks); "corpus" = BM25 passages (ours)
    corpus: str | None = None  # JSONL {id, title, text} for --retrieval corpus
    n_heads: int = 5  # paper: 5 heads in every configuration
    n_passages: int = N_PASSAGES  # corpus mode: passages per retrieval (DRAGIN retrieve_topk)
    query_words: int = QUERY_WORDS  # corpus mode: query length in words (DRAGIN keep_top_k)
    seed: int = 0  # random strategies: RNG seeded from (seed, question id, strategy)
    static_ranking: dict[str, Any] | None = None  # source of the static ranking (filled in by run_rag)
    regressor: dict[str, Any] | None = None  # source of the dynamic regressor (filled in by run_rag)
    loop: loop.RagConfig = field(default_factory=loop.RagConfig)
    trigger: RindTrigger = field(default_factory=RindTrigger)  # θ 1.2: DRAGIN's HotpotQA config (paper silent)
    windows: HeadWindowRetriever = field(default_factory=HeadWindowRetriever)  # k 10, window 64 (paper silent)


def check_inputs(settings: RagSettings, loaded=None) -> tuple[Any, Any]:
    """Validate what needs no model (strategies, questions, corpus): (loaded questions, retrieval mode).

    `loaded`: the questions when the caller already read `settings.task` (they are not read twice).
    """
    if not settings.strategies:
        raise ConfigError("no head strategy given (--heads)")
    for name in settings.strategies:
        RAG.get(name)
    loaded = loaded if loaded is not None else load_questions(settings.task)
    return loaded, retrieval_modes.get(settings.retrieval).from_settings(settings)


def run_rag(lm: LoadedModel, settings: RagSettings, out: str | Path, static_ranking: str | None = None,
            regressor: str | None = None, quiet: bool = False, inputs: tuple[Any, Any] | None = None,
            runner: Runner = run_samples) -> RunDir:
    """Run every strategy on every question into `out` (resuming per question); write results/rag.json.

    `inputs`: the result of `check_inputs(settings)` when the caller validated before loading the model.
    """
    style = resolve_prompt_style(lm.tokenizer, settings.task.prompt_style)
    settings = replace(settings, task=replace(settings.task, prompt_style=style))
    if inputs is not None and len(inputs[0]) and inputs[0][0].prompt.style != style:  # checked before "auto" was resolved
        inputs = check_inputs(settings)
    loaded, mode = inputs or check_inputs(settings)
    # resolved paths and content hashes: a resumed run compares them, so it cannot mix inputs
    settings = replace(settings, task=replace(settings.task, data=resolved(settings.task.data)),
                       corpus=resolved(settings.corpus))
    files = {"data": fingerprint(settings.task.data), "corpus": settings.corpus and fingerprint(settings.corpus)}
    static_ranking, regressor = resolved(static_ranking), resolved(regressor)
    ids = {s.id for s in loaded}
    ranking, ranking_info = (load_ranking(static_ranking, lm.layout, ids) if "static" in settings.strategies
                             else (None, None))
    saved = Path(out) / "results" / "regressor.pt"  # a resumed run reuses the regressor it trained
    reg, reg_info = (load_regressor(regressor, lm.layout, ids, settings.seed, saved if saved.is_file() else None)
                     if "dynamic" in settings.strategies else (None, None))
    settings = replace(settings, static_ranking=ranking_info, regressor=reg_info)
    run = RunDir.create(out, run_config("rag", lm, settings.seed, rag=settings, inputs=files))
    if reg is not None and regressor is not None and Path(regressor).is_dir():
        reg.save(run.path / "results" / "regressor.pt")
    _check_shapes(ranking, reg, lm.layout)
    def strategy(name: str):  # its head set, built afresh for each question (a fixed random draw is per question)
        return build(RAG.get(name), k=settings.n_heads, ranking=ranking, predictor=reg)

    for name in settings.strategies:  # every strategy's inputs are checked before the first question
        strategy(name)
    tracer = Tracer(lm, TraceConfig(stop_at_newline=style == "completion"))
    task = get_task("multihop")

    def work(enc):
        prepared = loop.prepare(tracer, enc)
        arrays, per = {}, {}
        for name in settings.strategies:
            rng = np.random.default_rng([settings.seed, zlib.crc32(enc.sample.id.encode()), zlib.crc32(name.encode())])
            res = loop.run(tracer, enc, settings.trigger, mode, strategy(name), settings.loop, rng, prepared)
            arrays.update({f"{name}__{k}": v for k, v in res.arrays.items()})
            per[name] = {"response": res.response, **task.metric(res.response, enc.sample),
                         "n_retrievals": len(res.retrievals), "n_drafts": res.n_drafts, "stopped": res.stopped,
                         "n_tokens": len(res.token_ids), "support_coverage": res.support_coverage,
                         "opened_fraction": res.opened_fraction, "retrievals": [asdict(r) for r in res.retrievals]}
        return arrays, {"strategies": per}

    runner(run, (encode(s, lm.tokenizer) for s in loaded), work, len(loaded), quiet)
    summary = summarize(run.sample_results(), settings.strategies, np.random.default_rng(settings.seed))
    run.write_result("rag", {**summary, "paper": PAPER_TABLE4, "load_report": asdict(loaded.report),
                             "n_docs": getattr(getattr(mode, "retriever", None), "n_docs", None)})
    return run


def summarize(rows: list[dict[str, Any]], names: tuple[str, ...] | list[str], rng: np.random.Generator,
              n_boot: int = 2000) -> dict[str, Any]:
    """Per strategy: EM/F1 with 95% bootstrap CIs, retrievals, support coverage; paired tests against static.

    rows: the per-question results (`{"strategies": {name: {"em", "f1", "n_retrievals", ...}}}`).
    """
    if not rows:
        raise DataError("no finished questions to summarise")
    out: dict[str, Any] = {"n_questions": len(rows), "strategies": {}, "vs_static": {}}
    for name in names:
        per = [r["strategies"][name] for r in rows]
        cov = [p["support_coverage"] for p in per if p.get("support_coverage") is not None]
        opened = [p["opened_fraction"] for p in per if p.get("opened_fraction") is not None]
        out["strategies"][name] = {
            "em": asdict(bootstrap_ci(np.array([p["em"] for p in per]), rng, n_boot)),
            "f1": asdict(bootstrap_ci(np.array([p["f1"] for p in per]), rng, n_boot)),
            "retrievals_per_question": float(np.mean([p["n_retrievals"] for p in per])),
            "support_coverage": float(np.mean(cov)) if cov else None,
            "support_coverage_ci": asdict(bootstrap_ci(np.array(cov), rng, n_boot)) if cov else None,
            "opened_fraction": float(np.mean(opened)) if opened else None,
            "tokens_per_answer": float(np.mean([p["n_tokens"] for p in per])),
        }
    if "static" in names:
        base = [r["strategies"]["static"] for r in rows]
        for name in names:
            if name == "static":
                continue
            per = [r["strategies"][name] for r in rows]
            out["vs_static"][name] = {m: asdict(paired_difference(np.array([p[m] for p in per]),
                                                                  np.array([b[m] for b in base]), rng, n_boot))
                                      for m in ("em", "f1")}
    return out


def format_rag_table(summary: dict[str, Any], model_name: str, paper_model: str = "llama3.1-8b") -> str:
    """Our EM / F1 per strategy (with 95% CIs) beside the paper's Table 4 rows."""
    ours = summary["strategies"]
    cols = [c for c in COLUMNS if c in ours or c in PAPER_TABLE4[paper_model]]
    cell = lambda em, f1: f"{em:.3f}/{f1:.4f}"  # noqa: E731
    lines = ["Table 4 (HotpotQA, EM / F1)", f"{'':<24}" + "".join(f"{TITLES[c]:>16}" for c in cols)]
    for model, row in PAPER_TABLE4.items():
        lines.append(f"{'paper ' + model:<24}" + "".join(f"{cell(*row[c]) if c in row else '-':>16}" for c in cols))
    name = f"ours {model_name} (n={summary['n_questions']})"
    lines.append(f"{name:<24}" + "".join(
        f"{cell(ours[c]['em']['estimate'], ours[c]['f1']['estimate']) if c in ours else '-':>16}" for c in cols))
    ci = lambda iv: f"[{iv['low']:.2f},{iv['high']:.2f}]"  # noqa: E731
    lines.append(f"{'  95% CI EM':<24}" + "".join(f"{ci(ours[c]['em']) if c in ours else '':>16}" for c in cols))
    lines.append(f"{'  95% CI F1':<24}" + "".join(f"{ci(ours[c]['f1']) if c in ours else '':>16}" for c in cols))
    lines.append(f"{'  retrievals/question':<24}" + "".join(
        f"{ours[c]['retrievals_per_question']:>16.2f}" if c in ours else f"{'':>16}" for c in cols))
    lines.append(f"{'  support coverage':<24}" + "".join(
        f"{_opt(ours[c]['support_coverage']):>16}" if c in ours else f"{'':>16}" for c in cols))
    for name, tests in summary.get("vs_static", {}).items():
        f1 = tests["f1"]
        lines.append(f"{name} - static: F1 {f1['mean_difference']:+.4f} [{f1['low']:+.3f}, {f1['high']:+.3f}], "
                     f"Wilcoxon p={f1['p_value']:.3g}; EM {tests['em']['mean_difference']:+.3f} "
                     f"(p={tests['em']['p_value']:.3g}; {f1['n_nonzero']} of {f1['n']} questions differ in F1)")
    return "\n".join(lines)


def load_ranking(path: str | None, layout: HeadLayout, question_ids: set[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Static ranking [L, H]: a head_score JSON, or the mean Eq. 2 score per head over a separate multihop run."""
    if path is None:
        raise ConfigError("strategy 'static' needs --static-ranking (a head_scores JSON or a multihop run folder)")
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".tsv":  # DuoAttention full_attention_heads.tsv
        from dynheads.analyses.head_export import ranking_from_duo_tsv

        return ranking_from_duo_tsv(p, layout), {"kind": "duo_tsv", "path": str(p)}
    if p.is_file():
        from dynheads.analyses.rankings import ranking_from_head_scores

        return ranking_from_head_scores(p, layout), {"kind": "head_scores", "path": str(p)}
    run = _detection_run(p, layout, question_ids, "static ranking")
    records = run.read_records()
    score = records.array("score")
    return score.mean(axis=0), {"kind": "run", "path": str(p), "rank_by": "mean score over all steps",
                                "n_samples": len(records.samples()), "n_steps": int(len(score))}


def load_regressor(path: str | None, layout: HeadLayout, question_ids: set[str], seed: int = 0,
                   trained: Path | None = None) -> tuple[Probe, dict[str, Any]]:
    """The dynamic strategy's regressor: a saved .pt, or one trained on a separate multihop run folder.

    `trained`: a regressor this run already trained from the same folder (reused on resume).
    """
    if path is None:
        raise ConfigError("strategy 'dynamic' needs --regressor (a saved regressor .pt or a multihop run folder)")
    p = Path(path).expanduser()
    if p.is_dir() and trained is not None:
        reg = Probe.load(trained)
        if reg.meta.get("run") == str(p):
            return reg, {"kind": "run", "path": str(p), **{k: v for k, v in reg.meta.items() if k != "sample_ids"}}
    if p.is_file():
        reg = Probe.load(p)
        _check_disjoint(set(reg.meta.get("sample_ids", [])), question_ids, p, "regressor")
        return reg, {"kind": "file", "path": str(p), **{k: v for k, v in reg.meta.items() if k != "sample_ids"}}
    run = _detection_run(p, layout, question_ids, "regressor")
    records = run.read_records()
    sample_ids = records.sample_ids
    if len(np.unique(sample_ids)) < 2:
        raise ConfigError(f"regressor run {p} needs at least 2 finished samples to hold one out for validation")
    meta = {"run": str(p), "score": run.config["score"]["name"], "sample_ids": sorted(set(sample_ids.tolist()))}
    reg = fit_regressor(records.hidden(), records.array("score"), sample_ids, np.random.default_rng(seed), meta,
                        steps=records.step)
    return reg, {"kind": "run", "path": str(p), **{k: v for k, v in reg.meta.items() if k != "sample_ids"}}


def fit_regressor(hidden: np.ndarray, scores: np.ndarray, sample_ids: np.ndarray, rng: np.random.Generator,
                  meta: dict[str, Any] | None = None, config: ProbeConfig | None = None,
                  steps: np.ndarray | None = None) -> Probe:
    """The Table 3 regressor the `dynamic` strategy applies: hidden [N, d] → Eq. 2 scores [N, L, H].

    `analyses.probes.fit_probe` with `ProbeConfig(regress=True)` (hidden layers (2d, d, d), dropout 0.1,
    Adam 3e-4, batch 128, gradient clip 1.0, MSE, early stopping) and a 90/10 train/validation split by
    question (the probe table's test part is not needed here).
    """
    cfg = config or ProbeConfig(regress=True, split=(0.9, 0.1, 0.0))
    return fit_probe(hidden, scores, sample_ids, steps, cfg, rng, meta=meta)


def _check_shapes(ranking: np.ndarray | None, regressor: Probe | None, layout: HeadLayout) -> None:
    """The static ranking and the regressor must cover the model's layers × heads."""
    if ranking is not None and tuple(np.shape(ranking)) != layout.shape:
        raise ConfigError(f"the static ranking has shape {np.shape(ranking)}; the model has {layout.shape}")
    if regressor is not None and tuple(regressor.shape) != layout.shape:
        raise ConfigError(f"the regressor predicts {regressor.shape[0]}×{regressor.shape[1]} heads; "
                          f"the model has {layout.n_layers}×{layout.n_heads}")


def _detection_run(p: Path, layout: HeadLayout, question_ids: set[str], what: str) -> RunDir:
    if not p.is_dir():
        raise ConfigError(f"{what} {p} does not exist")
    run = RunDir.open(p)
    cfg = run.config
    if "score" not in cfg or "layout" not in cfg:
        raise ConfigError(f"{what} {p} is not a traced detection run (no score in its config)")
    if (cfg["layout"]["n_layers"], cfg["layout"]["n_heads"]) != layout.shape:
        raise ConfigError(f"{what} {p} has {cfg['layout']['n_layers']}×{cfg['layout']['n_heads']} heads; "
                          f"the model has {layout.n_layers}×{layout.n_heads}")
    _check_disjoint(run.done_samples(), question_ids, p, what)
    return run


def _check_disjoint(theirs: set[str], ours: set[str], p: Path, what: str) -> None:
    shared = sorted(theirs & ours)
    if shared:
        raise ConfigError(f"{what} {p} was computed on {len(shared)} of the evaluated questions (e.g. {shared[0]}); "
                          "use a detection run on other questions")


def _opt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
