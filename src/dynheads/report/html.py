"""report.html (one self-contained file: figures inline as base64, no network) and report.md of a reproduction.

`build_report(out)` reads only result files (collect.py), computes the verdicts (verdicts.py) and lays
out the same sections twice. The markdown links the figures by their path inside `out`.
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from dynheads.report.collect import collect
from dynheads.report.sections import Section, Table, sections
from dynheads.report.verdicts import Verdict, all_verdicts

_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}caption{text-align:left;font-style:italic;padding:2px 0}figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #eee}.v-reproduced{color:#070;font-weight:bold}
.v-not-reproduced{color:#a00;font-weight:bold}.v-not-comparable{color:#a60;font-weight:bold}
.paper{background:#f7f7ff;border-left:3px solid #88c;padding:4px 8px}code{font-size:12px}"""
_STEP_ORDER = ("niah", "dynamism", "cca", "probe_k", "ablation", "progressive", "multihop", "probe_regress", "rag")
_MIME = {".png": "image/png", ".svg": "image/svg+xml"}


def build_report(out: str | Path) -> tuple[Path, Path, list[Verdict]]:
    """Write out/report.html and out/report.md; returns their paths and the verdicts."""
    out = Path(out)
    data = collect(out)
    verdicts = all_verdicts(data)
    secs = sections(data)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(data, verdicts, secs))
    md_path.write_text(render_md(data, verdicts, secs))
    return html_path, md_path, verdicts


def provenance(data: dict[str, Any]) -> tuple[list[str], Table]:
    """Model, sha256 and versions as lines; commands, status and wall time per experiment as a table."""
    cfg, state = data.get("config") or {}, data["state"]
    model = state.get("model") or cfg.get("model") or {}
    lines = [f"model: {model.get('source', state['config']['model'])} ({model.get('path', '?')})",
             f"sha256: {model.get('fingerprint', '?')}",
             "library versions: " + ", ".join(f"{k} {v}" for k, v in (cfg.get("versions") or {}).items()),
             f"reproduction: dynheads reproduce --model {state['config']['model']} --preset "
             f"{state['config']['preset']} --out {data['out']} (started {state.get('created', '?')}; report built "
             f"{time.strftime('%Y-%m-%dT%H:%M:%S')})"]
    order = list(state["steps"])
    order.sort(key=lambda n: next((i for i, p in enumerate(_STEP_ORDER) if n.startswith(p)), len(_STEP_ORDER)))
    rows = [[name, e.get("status", "?") + (f": {e['reason']}" if e.get("reason") else ""),
             f"{e.get('wall_s', e.get('wall_s_before', 0)):.0f}", e.get("command", "")]
            for name, e in ((n, state["steps"][n]) for n in order)]
    return lines, Table("experiments (each step's equivalent command)", ["step", "status", "wall s", "command"], rows)


def render_html(data: dict[str, Any], verdicts: list[Verdict], secs: list[Section]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>dynheads reproduction report</title>",
             f"<style>{_CSS}</style></head><body><h1>Retrieval Heads are Dynamic — paper vs ours</h1>",
             "<h2 id='verdicts'>Verdicts</h2>",
             _html_table(Table("verdict per claim (rules in the README)", ["claim", "verdict", "reason"],
                               [[v.claim, v.verdict, v.reason] for v in verdicts]), verdict_col=1)]
    for v in verdicts:
        if v.checks:
            parts.append(f"<details><summary>{e(v.claim)}: checks</summary><ul>" + "".join(
                f"<li>{'✔' if ok else '✘'} {e(c)}</li>" for c, ok in v.checks) + "</ul></details>")
    for s in secs:
        parts.append(f"<h2 id='{s.id}'>{e(s.title)}</h2><p class='paper'>Paper: {e(s.paper)}</p>")
        parts += [_html_table(t) for t in s.tables]
        parts += [f"<p>{e(n)}</p>" for n in s.notes]
        for caption, path in s.figures:
            b64 = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<figure><img alt='{e(caption)}' src='data:{_MIME[path.suffix]};base64,{b64}'>"
                         f"<figcaption>{e(caption)}</figcaption></figure>")
    lines, table = provenance(data)
    parts.append("<h2 id='provenance'>Model, versions, commands</h2>" + "".join(f"<p><code>{e(l)}</code></p>" for l in lines))
    parts.append(_html_table(table) + "</body></html>")
    return "\n".join(parts)


def render_md(data: dict[str, Any], verdicts: list[Verdict], secs: list[Section]) -> str:
    out = ["# Retrieval Heads are Dynamic — paper vs ours", "",
           _md_table(Table("Verdicts (rules in the README)", ["claim", "verdict", "reason"],
                           [[v.claim, f"**{v.verdict}**", v.reason] for v in verdicts]))]
    for s in secs:
        out += [f"## {s.title}", "", f"Paper: {s.paper}", ""]
        out += [_md_table(t) for t in s.tables]
        out += [n + "\n" for n in s.notes]
        out += [f"![{c}]({p.relative_to(data['out']) if p.is_relative_to(data['out']) else p})\n" for c, p in s.figures]
    lines, table = provenance(data)
    out += ["## Model, versions, commands", ""] + [f"- `{l}`" for l in lines] + ["", _md_table(table)]
    return "\n".join(out) + "\n"


def _html_table(t: Table, verdict_col: int | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(
        f"<td class='v-{e(v).replace(' ', '-')}'>{e(v)}</td>" if i == verdict_col else f"<td>{e(v)}</td>" for i, v in enumerate(r))
        + "</tr>" for r in t.rows)
    return f"<table><caption>{e(t.caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(t: Table) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    rows = [f"*{t.caption}*", "", "| " + " | ".join(map(cell, t.columns)) + " |",
            "|" + "---|" * len(t.columns)] + ["| " + " | ".join(map(cell, r)) + " |" for r in t.rows]
    return "\n".join(rows) + "\n"
