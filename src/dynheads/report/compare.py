"""Several models' reproductions side by side: `dynheads report RUN_A RUN_B … --out DIR`.

For each claim one table: a row per statistic, the paper's Llama-3.1-8B value, then each model's value
with its 95% interval, and the claim's verdict per model (verdicts.py, the same rules as a single
report). Reads only result files (collect.py), never a model.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from dynheads.errors import ConfigError
from dynheads.report.collect import collect
from dynheads.report.html import _CSS, _html_table, _md_table
from dynheads.report.sections import PAPER_MODEL, Table, ci
from dynheads.report.verdicts import Verdict, all_verdicts


def build_comparison(runs: list[str | Path], out: str | Path) -> tuple[Path, Path, dict[str, list[Verdict]]]:
    """Write out/report.html and out/report.md comparing the reproductions in `runs`."""
    if len(runs) < 2:
        raise ConfigError("a comparison needs at least two reproduction folders")
    datas = [collect(r) for r in runs]
    names = _unique_names(datas)
    verdicts = {n: all_verdicts(d) for n, d in zip(names, datas)}
    tables = comparison_tables(datas, names, verdicts)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc.strerror}") from None
    sources = [f"{n}: {Path(r).resolve()}" for n, r in zip(names, runs)]
    html_path, md_path = out / "report.html", out / "report.md"
    title = "Retrieval Heads are Dynamic — paper vs " + ", ".join(names)
    e = html.escape
    html_path.write_text("\n".join(
        [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head>"
         f"<body><h1>{e(title)}</h1>"] + [_html_table(t) for t in tables]
        + ["<h2>Reproductions</h2>"] + [f"<p><code>{e(s)}</code></p>" for s in sources]
        + [f"<p>built {time.strftime('%Y-%m-%dT%H:%M:%S')} by <code>dynheads report {' '.join(map(str, runs))} "
           f"--out {e(str(out))}</code></p></body></html>"]))
    md_path.write_text("\n".join([f"# {title}", ""] + [_md_table(t) for t in tables]
                                 + ["## Reproductions", ""] + [f"- `{s}`" for s in sources]) + "\n")
    return html_path, md_path, verdicts


def comparison_tables(datas: list[dict[str, Any]], names: list[str], verdicts: dict[str, list[Verdict]]) -> list[Table]:
    """One table per claim: statistic | paper | each model (value [95% CI]) | …, and a verdict row."""
    cols = ["statistic", f"paper ({PAPER_MODEL})"] + names
    specs = [("Claim 1 — dynamism (Table 1, NIAH)", _claim1_rows, 0),
             ("Claim 2 — irreplaceability (Fig. 2, per-step ablation; accuracy)", _claim2_rows, 1),
             ("Claim 3 — correlation (Fig. 4 held-out CCA top-1, Table 2 probe at k = 0)", _claim3_rows, 2),
             ("Dynamic RAG (Table 4, HotpotQA F1)", _rag_rows, 3)]
    tables = []
    for caption, rows_of, v in specs:
        per_model = [rows_of(d) for d in datas]
        stats = list(dict.fromkeys(k for rows in per_model for k in rows))
        paper = {s: next((rows[s][0] for rows in per_model if s in rows), "–") for s in stats}
        rows = [[s, paper[s]] + [rows[s][1] if s in rows else "–" for rows in per_model] for s in stats]
        rows.append(["verdict", "–"] + [f"{verdicts[n][v].verdict}: {verdicts[n][v].reason}" for n in names])
        tables.append(Table(caption, cols, rows))
    return tables


# --- one claim's rows: {statistic: (paper value, our value with its interval)} ---------------------------
def _claim1_rows(d: dict[str, Any]) -> dict[str, tuple[str, str]]:
    from dynheads.analyses.dynamism import PAPER_TABLE1 as p

    dyn, band = d["niah"]["dynamism"], d["niah"]["table1_ci"] or {}
    if not dyn:
        return {}
    s = dyn["stats"]
    iv = lambda k, f="{:.4f}": ci({"estimate": s[k], "low": band.get(k, [None])[0],  # noqa: E731
                                  "high": band.get(k, [None, None])[1]}, f)
    rows = d["niah"]["samples"]
    return {
        "NIAH samples (accuracy)": ("–", f"{s['n_samples']} ({sum(r['accuracy'] for r in rows) / len(rows):.3f})"),
        "dynamic heads / step": (f"{p['heads_per_step_mean']} ± {p['heads_per_step_sd']}",
                                 iv("heads_per_step_mean", "{:.2f}")),
        "heads ever active / total": (f"{p['heads_ever_active']} / {p['total_heads']}",
                                      f"{s['heads_ever_active']} / {s['total_heads']}"),
        "static set size": ("20", str(len(s["static_heads"]))),
        "Jaccard with static set": (str(p["jaccard_static"]), iv("jaccard_static")),
        "adjacent Jaccard": (str(p["adjacent_jaccard"]), iv("adjacent_jaccard")),
        "entropy (nats)": (str(p["entropy"]), iv("entropy") + f" vs ln {len(s['static_heads'])} = {s['ln_static_top']:.3f}"),
    }


def _claim2_rows(d: dict[str, Any]) -> dict[str, tuple[str, str]]:
    res = d["ablation"]["result"]
    if not res:
        return {}
    paper = {"none": "–", "dynamic": "≈ 0", "static": "mostly high", "random": "mostly high",
             "static_excluding_dynamic": "– (our control)"}
    rows = {f"accuracy, {c} masked": (paper.get(c, "–"), ci(m["accuracy"], "{:.2f}"))
            for c, m in res["conditions"].items()}
    for t in res["comparisons"]:
        if t["metric"] == "accuracy" and t["a"] == "dynamic":
            rows[f"dynamic − {t['b']} (paired)"] = ("–", f"{ci(t, '{:+.2f}')}, p = {t['p_value']:.2g}, n = {t.get('n', '?')}")
    rows["samples"] = ("–", str(res["n_samples"]))
    return rows


def _claim3_rows(d: dict[str, Any]) -> dict[str, tuple[str, str]]:
    from dynheads.analyses.cca import PAPER_FIG4_TOP1
    from dynheads.analyses.probe_table import PAPER_TABLE2

    rows: dict[str, tuple[str, str]] = {}
    cca = d["niah"]["cca"]
    for o in (cca or {}).get("offsets", []):
        if o["k"] in (0, 1):
            rows[f"CCA top-1, k = {o['k']} (ours held out; paper in-sample)"] = (
                f"{PAPER_FIG4_TOP1[o['k']]:.3f}", ci(o["heldout_top1_ci"]))
            rows[f"hidden − position, k = {o['k']}"] = ("–", ci(o["margin_over_position"], "{:+.3f}"))
    probe = d["niah"]["probes"].get(0) or d["niah"]["probes"].get("0")
    if probe:
        mlp = probe["predictors"][0]["metrics"]
        rows["probe F1, k = 0"] = (f"{PAPER_TABLE2[PAPER_MODEL][0]:.4f}", f"{mlp['f1']:.4f}")
        rows["probe AUPRC, k = 0"] = (f"{PAPER_TABLE2[PAPER_MODEL][3]:.4f}", f"{mlp['auprc']:.4f}")
    return rows


def _rag_rows(d: dict[str, Any]) -> dict[str, tuple[str, str]]:
    from dynheads.runners.rag import PAPER_TABLE4, TITLES

    res = d["rag"]["result"]
    if not res:
        return {}
    ref = PAPER_TABLE4[PAPER_MODEL]
    rows = {f"F1, {TITLES.get(n, n)}": (f"{ref[n][1]:.4f}" if n in ref else "–", ci(s["f1"], "{:.3f}"))
            for n, s in res["strategies"].items()}
    t = res.get("vs_static", {}).get("dynamic")
    if t:
        rows["dynamic − static F1 (paired)"] = (f"{ref['dynamic'][1] - ref['static'][1]:+.4f}",
                                                f"{ci(t['f1'], '{:+.3f}')}, p = {t['f1']['p_value']:.2g}")
    rows["questions"] = ("500 (inferred)", str(res["n_questions"]))
    return rows


def _unique_names(datas: list[dict[str, Any]]) -> list[str]:
    """Each reproduction's model name (its --model source), made unique when two share one."""
    names = []
    for d in datas:
        model = (d.get("state") or {}).get("config", {}).get("model") or "model"
        name = Path(str(model)).name
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
    return names
