"""`dynheads view`: one self-contained HTML page showing, token by token, what every head of a run did.

The page embeds compact JSON (prompt tokens, named spans, per condition: answer tokens, the step score
[T, L, H], D_t, top-1 and top-k attended positions) and renders it with plain JS (assets/view.js, no
network). Conditions: a traced run (niah, multihop) has one; an ablation run one per masked condition
(D_t of each from its clean pass, masked heads shown hatched); a RAG run one per head strategy (the
Eq. 2 support mass per head, the windows its retrievals opened). Prompt tokens are re-encoded with the
run's tokenizer from the stored sample (checked against the stored prompt length and spans).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynheads.errors import DataError
from dynheads.heads import HeadLayout
from dynheads.records import load_sample_records
from dynheads.runs import RunDir, safe_name

STATIC_TOP = 20


def write_view(run_dir: str | Path, sample_id: str | None, out: str | Path, tokenizer=None) -> Path:
    """Write the viewer page of one sample (default: the first finished one) to `out`."""
    from dynheads.runs import check_out_file

    check_out_file(out)  # a folder, or a path under a file, fails before the page is built
    data = view_data(run_dir, sample_id, tokenizer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data))
    return out


def view_data(run_dir: str | Path, sample_id: str | None = None, tokenizer=None) -> dict[str, Any]:
    """The JSON the page embeds (see the module docstring)."""
    run = RunDir.open(run_dir)
    cfg = run.config
    missing = [k for k in ("kind", "layout", "model") if k not in cfg]
    if missing:
        raise DataError(f"{run.path}/config.json has no '{missing[0]}': it is not the config of a traced run")
    rows = run.sample_results()
    if not rows:
        raise DataError(f"{run.path} has no finished samples")
    by_id = {r["id"]: r for r in rows}
    if sample_id is not None and sample_id not in by_id:
        raise DataError(f"sample '{sample_id}' is not in {run.path} (have e.g. {rows[0]['id']})")
    row = by_id[sample_id] if sample_id else rows[0]
    layout = HeadLayout(**cfg["layout"])
    from dynheads.models import load_tokenizer  # imports torch: after the run folder is checked

    tok = tokenizer or load_tokenizer(cfg["model"].get("path") or cfg["model"]["source"])
    prompt_ids = _prompt_ids(row, tok)
    decode = lambda ids: [tok.decode([int(i)]) for i in ids]  # noqa: E731
    conds = conditions(cfg, load_sample_records(run.path / "records" / f"{safe_name(row['id'])}.npz"), row, layout)
    static, source = static_ranking(run, layout)
    return {
        "title": f"{row['id']} — {Path(str(cfg['model'].get('path') or cfg['model']['source'])).name}",
        "subtitle": f"{cfg['kind']} run {run.path.name}; {len(prompt_ids)} prompt tokens; score: {_score_name(cfg)}"
                    + (f"; response: {row['response'][:200]!r}" if "response" in row else ""),
        "layers": layout.n_layers, "heads": layout.n_heads, "prompt": decode(prompt_ids),
        "marks": {k: [list(s) for s in v] for k, v in row["token_spans"].items()},
        "conditions": [_compact(c, decode) for c in conds], "static": static, "static_source": source,
    }


def conditions(cfg: dict[str, Any], arrays: dict[str, np.ndarray], row: dict[str, Any], layout: HeadLayout) -> list[dict]:
    """Per condition: name, token ids, score [T, L, H], D_t bool or None, top-1/top-k, ablated, windows."""
    kind = cfg["kind"]
    if kind.startswith("ablation"):
        from dynheads.scores.copy_paste import copy_paste_active

        span = cfg.get("ablation", {}).get("span", "needle")
        out = []
        for name in row["conditions"]:
            sub = {k[len(name) + 2:]: v for k, v in arrays.items() if k.startswith(name + "__")}
            n = len(sub["token_id"])
            key = "clean_token_id" if "clean_token_id" in sub else "token_id"
            dt = (copy_paste_active(sub, row["token_spans"], span=span, generated_key=key) if n
                  else np.zeros((0,) + layout.shape, bool))
            out.append({"name": name, "token_id": sub["token_id"], "score": dt.astype(np.float32), "active": dt,
                        "top1": sub.get("top1_pos"), "ablated": sub.get("ablated"),
                        "note": f"{int(sub['ablated'].sum()) if 'ablated' in sub else 0} head-steps masked"})
        return out
    if kind == "rag":
        out = []
        for name, res in row["strategies"].items():
            sub = {k[len(name) + 2:]: v for k, v in arrays.items() if k.startswith(name + "__")}
            windows = [list(w) for r in res.get("retrievals", []) for w in r.get("windows", [])]
            out.append({"name": name, "token_id": sub["token_id"], "score": np.nan_to_num(sub["mass_support"]),
                        "active": None, "top1": None, "windows": windows,
                        "note": f"{len(res.get('retrievals', []))} retrievals; score = attention mass on support"})
        return out
    from dynheads.scores.base import get_score

    score = arrays["score"]
    return [{"name": kind, "token_id": arrays["token_id"], "score": score,
             "active": get_score(cfg["score"]["name"]).active(score), "top1": arrays.get("top1_pos"),
             "topk_pos": arrays.get("topk_pos"), "topk_weight": arrays.get("topk_weight")}]


def static_ranking(run: RunDir, layout: HeadLayout) -> tuple[list[list], str]:
    """Top heads by activation frequency: the run's dynamism result, else its first condition (RAG: `full`) over
    all samples."""
    res = _read_result(run.path, "dynamism")
    labels = layout.labels()
    if res and "frequency" in res:
        freq = np.array([res["frequency"].get(l, 0.0) for l in labels])
        source = "activation frequency, results/dynamism.json"
    else:
        total, steps = np.zeros(layout.n_total), 0
        for r in run.sample_results():
            arrays = load_sample_records(run.path / "records" / f"{safe_name(r['id'])}.npz")
            conds = conditions(run.config, arrays, r, layout)  # RAG: the full-context strategy sees the support
            c = next((x for x in conds if x["name"] == "full"), conds[0])
            if len(c["token_id"]):
                x = c["active"] if c["active"] is not None else c["score"]
                total += np.asarray(x, float).reshape(len(c["token_id"]), -1).sum(0)
                steps += len(c["token_id"])
        freq = total / max(steps, 1)
        source = f"mean per-step score of the '{c['name']}' condition over {len(run.sample_results())} samples"
    order = np.lexsort((np.arange(freq.size), -freq))[:STATIC_TOP]
    return [[int(f), round(float(freq[f]), 4)] for f in order], source


def render(data: dict[str, Any]) -> str:
    """The page: a fixed HTML skeleton, the CSS and JS assets and the data, all inline."""
    assets = resources.files("dynheads.report") / "assets"
    css, js = (assets / "view.css").read_text(), (assets / "view.js").read_text()
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
    return (assets / "view.html").read_text().replace("/*CSS*/", css).replace(
        "/*DATA*/", payload).replace("/*JS*/", js)


# --- internals -----------------------------------------------------------------------------
def _compact(c: dict, decode: Callable) -> dict:
    """Flat, rounded lists (the page indexes [t * L*H + flat head]); D_t and masks as index lists."""
    t = len(c["token_id"])
    flat = lambda a: np.asarray(a).reshape(t, -1)  # noqa: E731
    score = flat(c["score"]).astype(float)
    binary = bool(np.isin(score, (0.0, 1.0)).all())
    out = {"name": c["name"], "note": c.get("note", ""), "tokens": decode(c["token_id"]),
           "score": score.astype(int).ravel().tolist() if binary else np.round(score, 3).ravel().tolist(),
           "active": None if c.get("active") is None else [np.flatnonzero(r).tolist() for r in flat(c["active"])],
           "ablated": None if c.get("ablated") is None else [np.flatnonzero(r).tolist() for r in flat(c["ablated"])],
           "top1": None if c.get("top1") is None else flat(c["top1"]).ravel().astype(int).tolist(),
           "topk_pos": None, "topk_weight": None, "k": 0, "windows": c.get("windows")}
    if c.get("topk_pos") is not None and t:
        k = c["topk_pos"].shape[-1]
        out.update(k=int(k), topk_pos=c["topk_pos"].reshape(-1).astype(int).tolist(),
                   topk_weight=np.round(c["topk_weight"].reshape(-1).astype(float), 3).tolist())
    return out


def _prompt_ids(row: dict[str, Any], tokenizer) -> list[int]:
    """Re-encode the stored sample with the run's tokenizer; it must give the stored length and spans."""
    from dynheads.tasks.base import encode_stored

    return encode_stored(row, tokenizer).input_ids


def _score_name(cfg: dict[str, Any]) -> str:
    if cfg["kind"].startswith("ablation"):
        return "D_t (Eq. 1) of each condition's clean pass"
    if cfg["kind"] == "rag":
        return "attention mass on the supporting facts"
    return {"copy_paste": "Eq. 1 (copy-paste)", "reasoning": "Eq. 2 (reasoning)"}.get(cfg["score"]["name"],
                                                                                  cfg["score"]["name"])


def _read_result(path: Path, name: str):
    from dynheads.report.collect import read_result

    return read_result(path, name)
