"""The README's head-sparse study: runs of the same samples merged, then accuracy, KV read, paired differences
against `static` and the share of the oracle − static gap each deployable policy closes.

usage: python docs/sparse_study.py OUT_PNG PANEL [PANEL ...]
A PANEL is one or more `dynheads sparse` run folders joined by '+', all on the same samples (e.g. the main
comparison and a later run of new policies beside `static`); a condition present in several is taken from
the first, and a `static` condition present in several must agree sample by sample (the runs are deterministic).
Prints the markdown tables (accuracy [95% CI] with the real KV read, paired differences with Wilcoxon p, gap
closed) and draws one accuracy-against-KV-read panel per PANEL (report/sparse_figures.py).
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt

from dynheads.analyses.stats import ABOVE, paired_verdict
from dynheads.report.sparse_figures import accuracy_vs_kv_read
from dynheads.runners.sparse import DEPLOYABLE, SparseConfig, summarise
from dynheads.runs import RunDir
from dynheads.tracing.sparse import Sparsity

ORDER = ("full", "streaming", "static", "random", "oracle", "predicted", "query", "layerwise")


def merged(panel: str) -> tuple[list[dict], SparseConfig, dict]:
    """Per-sample rows with the conditions of every run of the panel, the merged config, the first run's task."""
    runs = [RunDir.open(Path(p), what="sparse run") for p in panel.split("+")]
    configs = [r.config["sparse"] for r in runs]
    rows: dict[str, dict] = {}
    for run in runs:
        for row in run.sample_results():
            into = rows.setdefault(row["id"], {"id": row["id"], "conditions": {}})
            for cond, values in row["conditions"].items():
                if cond in into["conditions"] and cond.startswith("static") and \
                        into["conditions"][cond]["accuracy"] != values["accuracy"]:
                    raise SystemExit(f"{panel}: {cond} differs between runs on {row['id']}")
                into["conditions"].setdefault(cond, values)
    ids = [set(r.done_samples()) for r in runs]
    if any(i != ids[0] for i in ids):
        raise SystemExit(f"{panel}: the runs hold different samples")
    policies = tuple(p for p in ORDER if any(p in c["policies"] for c in configs))
    budgets = tuple(sorted({k for c in configs for k in c["budgets"]}))
    first = configs[0]
    config = replace(SparseConfig(first["detection"], policies, budgets, Sparsity(**first["sparsity"]), seed=first["seed"],
                                  n_boot=first["n_boot"]))
    ordered = [rows[i] for i in sorted(rows)]
    missing = [(r["id"], c) for r in ordered for c in _conditions(config) if c not in r["conditions"]]
    if missing:  # a budget one run has and another lacks: keep only budgets every policy ran
        raise SystemExit(f"{panel}: condition {missing[0][1]} missing on {missing[0][0]}; give runs with the same budgets")
    return ordered, config, runs[0].config["task"]


def _conditions(config: SparseConfig) -> list[str]:
    from dynheads.runners.sparse import conditions

    return [c for c, _, _ in conditions(config)]


def title(task: dict, n: int) -> str:
    needles = task.get("num_needles") or 1
    what = "1 needle" if needles == 1 else f"{needles} needles ({task.get('mode')})"
    return f"{','.join(str(x) for x in task['lengths'])} tokens, {what}, {n} samples"


def gap_cell(result: dict, cond: str) -> str:
    """The share of the gap `cond` closes, with † where the oracle − static gap itself is not shown."""
    frac = result["gap_closed"].get(cond)
    return "—" if frac is None else f"{frac:+.2f}" + ("" if result["gap_shown"][cond] else " †")


def main(out: Path, panels: list[str]) -> None:
    results = []
    for panel in panels:
        rows, config, task = merged(panel)
        results.append((title(task, len(rows)), summarise(rows, config), config))
    heads = [t for t, _, _ in results]
    ci = lambda d: f"{d['estimate']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"  # noqa: E731
    print("| condition | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    names = [c for c in results[0][1]["conditions"]]
    for name in names:
        cells = [f"{ci(r['conditions'][name]['accuracy'])} @ {r['conditions'][name]['kv_read']['estimate']:.3f}"
                 if name in r["conditions"] else "" for _, r, _ in results]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| paired difference (accuracy) | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    tests = [(t["a"], t["b"]) for t in results[0][1]["comparisons"] if t["metric"] == "accuracy"]
    for a, b in tests:
        cells = []
        for _, r, _ in results:
            t = next(x for x in r["comparisons"] if x["a"] == a and x["b"] == b and x["metric"] == "accuracy")
            shown = paired_verdict(t).outcome == ABOVE
            value = f"{t['mean_difference']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}] ({t['p_value']:.2g})"
            cells.append(f"**{value}**" if shown else value)
        print(f"| {a} − {b} | " + " | ".join(cells) + " |")
    print("\n| share of the oracle − static gap closed | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for cond in results[0][1]["gap_closed"]:
        cells = [gap_cell(r, cond) for _, r, _ in results]
        print(f"| {cond} | " + " | ".join(cells) + " |")
    print("(†: the oracle − static gap at that budget is not itself shown by the paired rule, so the share is noise)")
    opened = "\nmean units open per step (of all layers): " + "; ".join(
        f"{t}: " + ", ".join(f"{c} {r['conditions'][c]['open_units']['estimate']:.1f}"
                             for c in r["conditions"] if r["conditions"][c]["policy"] in DEPLOYABLE)
        for t, r, _ in results)
    print(opened)
    cols = min(2, len(results))
    nrows = -(-len(results) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), layout="constrained", squeeze=False)
    for ax, (head, result, _) in zip(axes.flat, results):
        accuracy_vs_kv_read(result, title=head, ax=ax)
        ax.get_legend().remove()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(results):]
    for ax in spare:
        ax.axis("off")
    # the legend in a spare panel, else below the panels (inside one it hides points)
    if spare:
        spare[0].legend(handles, labels, fontsize=8, loc="center")
    else:
        fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncol=3)
    fig.savefig(out, dpi=110)
    print(f"\nfigure: {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[2])
    main(Path(sys.argv[1]), sys.argv[2:])
