"""The report's content as plain tables: for each table and figure of the paper, its number beside ours.

`sections(data)` turns the collected result files into `Section`s (tables of strings, figure paths,
notes); html.py and the markdown writer only lay them out, so report.html and report.md agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynheads.experiments.ablation import PAPER_FIG2
from dynheads.experiments.progressive import PAPER_FIG3
from dynheads.experiments.cca import PAPER_FIG4_TOP1
from dynheads.experiments.dynamism import PAPER_TABLE1, static_cap_note
from dynheads.experiments.probe_table import PAPER_TABLE2, PAPER_TABLE3
from dynheads.experiments.rag import PAPER_TABLE4, TITLES

PAPER_MODEL = "llama3.1-8b"


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    id: str
    title: str
    paper: str  # what the paper reports here, in words
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, file)
    notes: list[str] = field(default_factory=list)


def sections(data: dict[str, Any]) -> list[Section]:
    return [s for s in (_table1(data), _fig2(data), _fig3(data), _fig4(data), _table2(data), _multihop(data),
                        _table4(data)) if s is not None]


def ci(iv: dict | None, fmt: str = "{:.3f}") -> str:
    """'est [low, high]' of an interval dict (estimate/low/high or gap/low/high)."""
    if not iv:
        return "–"
    est = iv.get("estimate", iv.get("gap", iv.get("mean_difference")))
    if est is None:
        return "–"
    if iv.get("low") is None:
        return fmt.format(est)
    return f"{fmt.format(est)} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def _num(v, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def _missing(title: str, sid: str, paper: str, data: dict, step: str) -> Section:
    entry = data["state"]["steps"].get(step, {})
    why = f"was skipped: {entry.get('reason')}" if entry.get("status") == "skipped" else "has no result yet"
    return Section(sid, title, paper, notes=[f"Not comparable — step '{step}' {why}."])


def _table1(data) -> Section:
    title, paper = "Claim 1 — dynamism (Table 1, Fig. 1)", (
        "Table 1: per-step dynamic heads (Eq. 1) on NIAH; Fig. 1: the 10 most variable heads of one answer.")
    dyn, rows, band = data["niah"]["dynamism"], data["niah"]["samples"], data["niah"]["table1_ci"] or {}
    if not dyn:
        return _missing(title, "claim1", paper, data, "dynamism")
    s, p = dyn["stats"], PAPER_TABLE1
    iv = lambda k, f="{:.4f}": ci({"estimate": s[k], "low": band.get(k, [None])[0],  # noqa: E731
                                  "high": band.get(k, [None, None])[1]}, f)
    n_static = len(s["static_heads"])  # the static set as used: capped below top-20 when fewer heads ever scored
    cols = ["model", "dyn. heads / step", "heads ever active / total", f"Jaccard w/ static top-{n_static}",
            "adj. Jaccard", f"entropy (ln {n_static} = {s['ln_static_top']:.4f})"]
    table = Table("Table 1 — paper vs ours (95% bootstrap intervals over samples)", cols, [
        [f"{PAPER_MODEL} (paper)", f"{p['heads_per_step_mean']} ± {p['heads_per_step_sd']}",
         f"{p['heads_ever_active']} / {p['total_heads']}", str(p["jaccard_static"]), str(p["adjacent_jaccard"]),
         str(p["entropy"])],
        [f"{_model_name(data)} (ours)", iv("heads_per_step_mean", "{:.2f}") + f" (sd {s['heads_per_step_sd']:.2f})",
         f"{s['heads_ever_active']} / {s['total_heads']}", iv("jaccard_static"), iv("adjacent_jaccard"), iv("entropy")],
    ])
    acc = sum(r["accuracy"] for r in rows) / len(rows)
    notes = [f"{s['n_samples']} samples, accuracy {acc:.3f}; {s['n_steps']} answer steps, "
             f"{s['n_steps_without_heads']} with no active head; effective heads exp(entropy) = {s['effective_heads']:.1f}."]
    cap = static_cap_note(n_static, s.get("static_requested", n_static))
    notes += [cap] if cap else []
    figs = [("Fig. 1 — the 10 most variable heads over one answer", data["niah"]["figures"]["fig1"])]
    return Section("claim1", title, paper, [table], [f for f in figs if f[1]], notes)


def _fig2(data) -> Section:
    title, paper = "Claim 2 — per-step ablation (Fig. 2)", PAPER_FIG2
    res = data["ablation"]["result"]
    if not res:
        return _missing(title, "claim2", paper, data, "ablation")
    conds = res["conditions"]
    rows = [[c, ci(m["accuracy"], "{:.2f}"), _num(m["rouge_l"]["estimate"]), _num(m.get("heads_masked_per_step"), "{:.2f}"),
             _num(m.get("overlap_per_step"), "{:.2f}")] for c, m in conds.items()]
    main = Table(f"accuracy per masked condition ({res['n_samples']} samples; static_excluding_dynamic is our "
                 "control, absent from the paper)", ["condition", "accuracy [95% CI]", "ROUGE-L", "heads masked / step",
                                                      "of them in D_t"], rows)
    tests = Table("paired differences over samples", ["comparison", "metric", "mean difference [95% CI]",
                                                       "Wilcoxon p"],
                  [[f"{t['a']} − {t['b']}", t["metric"], ci(t, "{:+.3f}"), f"{t['p_value']:.3g}"] for t in res["comparisons"]])
    figs = [("Fig. 2 — accuracy per (depth, length) cell with heads masked per step", data["ablation"]["figure"])]
    return Section("claim2", title, paper, [main, tests], [f for f in figs if f[1]],
                   [f"matched head count (mean): {_num(res.get('matched_heads_mean'), '{:.2f}')}"])


def _fig3(data) -> Section:
    title, paper = "Claim 2 — progressive ablation (Fig. 3)", PAPER_FIG3
    res = data["progressive"]["result"]
    if not res:
        return _missing(title, "fig3", paper, data, "progressive")
    conds = res["conditions"]
    rows = [[str(k), ci(conds[f"k{k}"]["accuracy"], "{:.2f}"), ci(conds[f"k{k}"].get("compensation"), "{:.2f}")]
            for k in res["ks"]]
    table = Table(f"{res['n_samples']} samples", ["k (heads masked / step)", "accuracy [95% CI]",
                                                  "compensation m_s [95% CI]"], rows)
    figs = [("Fig. 3 — accuracy and compensation by static heads against k", data["progressive"]["figure"])]
    return Section("fig3", title, paper, [table], [f for f in figs if f[1]])


def _fig4(data) -> Section:
    title, paper = "Claim 3 — temporal CCA (Fig. 4)", (
        "Fig. 4 (llama3.1-8b, in-sample top-1 canonical correlation) decays from 0.965 at k = 0 to 0.743 at k = 10.")
    res = data["niah"]["cca"]
    if not res:
        return _missing(title, "fig4", paper, data, "cca")
    rows = [[str(o["k"]), _num(PAPER_FIG4_TOP1[o["k"]] if o["k"] < len(PAPER_FIG4_TOP1) else None),
             _num(o["in_sample"]["top1"]), ci(o["heldout_top1_ci"]), _num(o["null"]["top1"]),
             _num(o["persistence"]["top1"]), _num(o["position"]["top1"]),
             ci(o["margin_over_position"], "{:+.3f}")] for o in res["offsets"]]
    table = Table(f"{res['n_samples']} samples ({res['n_test_samples']} held out); null, persistence and position are "
                  "our controls", ["k", "paper top-1", "ours in-sample top-1", "ours held-out top-1 [95% CI]", "null",
                                   "persistence", "position", "hidden − position [95% CI]"], rows)
    figs = [("Fig. 4 — canonical correlation against the offset k", data["niah"]["figures"]["fig4"])]
    return Section("fig4", title, paper, [table], [f for f in figs if f[1]])


def _table2(data) -> Section:
    title = "Claim 3 — MLP probe (Table 2)"
    paper = "Table 2 (llama3.1-8b, k = 0): F1 {:.4f}, precision {:.4f}, recall {:.4f}, AUPRC {:.4f}.".format(
        *PAPER_TABLE2[PAPER_MODEL])
    probes = {int(k): v for k, v in data["niah"]["probes"].items() if v}
    if not probes:
        return _missing(title, "table2", paper, data, "probe_k0")
    tables = []
    for k, res in sorted(probes.items()):
        rows = [[f"{PAPER_MODEL} probe (paper)"] + [f"{v:.4f}" for v in PAPER_TABLE2[PAPER_MODEL]] + ["–"]] if k == 0 else []
        for pred in res["predictors"]:
            m = pred["metrics"]
            rows.append([pred["name"]] + [_num(m.get(c), "{:.4f}") for c in ("f1", "precision", "recall", "auprc")]
                        + [ci(res["gaps"].get(pred["name"]))])
        tables.append(Table(f"offset k = {k}: test {res['n_pairs']['test']} steps from {res['n_samples']['test']} "
                            "samples; every row below the probe is a baseline the paper lacks",
                            ["predictor", "F1", "precision", "recall", "AUPRC", "probe's F1 gap [95% CI]"], rows))
    return Section("table2", title, paper, tables)


def _multihop(data) -> Section:
    title = "Multi-hop QA (Fig. 6 grid, Table 3)"
    paper = "Table 3 (llama3.1-8b regressor of Eq. 2 scores): MSE {:.4f}, MAE {:.4f}, R² {:.4f}.".format(
        *PAPER_TABLE3[PAPER_MODEL])
    res, reg = data["multihop"]["result"], data["multihop"]["regress"]
    if not res:
        return _missing(title, "multihop", paper, data, "multihop")
    tables = [Table("detection run (HotpotQA)", ["questions", "EM", "F1"],
                    [[str(res["n_samples"]), f"{res['em']:.3f}", f"{res['f1']:.3f}"]])]
    notes = []
    if reg:
        rows = [[f"{PAPER_MODEL} (paper)"] + [f"{v:.4f}" for v in PAPER_TABLE3[PAPER_MODEL]] + ["–"]]
        rows += [[p["name"]] + [_num(p["metrics"].get(c), "{:.4f}") for c in ("mse", "mae", "r2")]
                 + [ci(reg["gaps"].get(p["name"]))] for p in reg["predictors"]]
        tables.append(Table(f"Table 3 — regressor, test {reg['n_samples']['test']} questions",
                            ["predictor", "MSE", "MAE", "R²", f"probe's {reg['gap_metric']} gap [95% CI]"], rows))
    else:
        notes.append(_missing(title, "", "", data, "probe_regress_k0").notes[0])
    figs = [("Fig. 6-style grid: F1 by context length × support depth", data["multihop"]["figure"])]
    return Section("multihop", title, paper, tables, [f for f in figs if f[1]], notes)


def _table4(data) -> Section:
    title, paper = "Dynamic RAG (Table 4)", "Table 4 (HotpotQA, EM / F1), paper rows for llama3.1-8b."
    res = data["rag"]["result"]
    if not res:
        return _missing(title, "table4", paper, data, "rag")
    ref = PAPER_TABLE4[PAPER_MODEL]
    rows = [[TITLES.get(n, n), "{} / {}".format(*ref[n]) if n in ref else "–", ci(s["em"], "{:.3f}"),
             ci(s["f1"], "{:.3f}"), f"{s['retrievals_per_question']:.2f}", _num(s.get("support_coverage"))]
            for n, s in res["strategies"].items()]
    main = Table(f"{res['n_questions']} questions; 'full context' is our upper bound, absent from the paper",
                 ["strategy", "paper EM / F1", "ours EM [95% CI]", "ours F1 [95% CI]", "retrievals / question",
                  "support tokens opened"], rows)
    tests = Table("paired differences against static", ["strategy − static", "F1 [95% CI]", "Wilcoxon p"],
                  [[n, ci(t["f1"], "{:+.3f}"), f"{t['f1']['p_value']:.3g}"] for n, t in res.get("vs_static", {}).items()])
    return Section("table4", title, paper, [main, tests])


def _model_name(data) -> str:
    model = (data.get("config") or {}).get("model", {})
    return Path(str(model.get("path") or model.get("source") or "model")).name
