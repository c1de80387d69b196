"""The README's head-sparse figure: accuracy against KV read for several `dynheads sparse` runs, one panel each.

usage: python docs/sparse_curves.py OUT_PNG RUN [RUN ...]
Two panels a row; each is the run's own `sparse_accuracy_vs_kv` figure (report/sparse_figures.py), titled by its task.
"""
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from dynheads.report.sparse_figures import accuracy_vs_kv_read


def title(run: Path, result: dict) -> str:
    task = json.loads((run / "config.json").read_text())["task"]
    n = task.get("num_needles") or 1
    needles = "1 needle" if n == 1 else f"{n} needles ({task.get('mode')})"
    length = ",".join(str(x) for x in task["lengths"])
    return f"{length} tokens, {needles}, {result['n_samples']} samples"


def main(out: Path, runs: list[Path]) -> None:
    cols = min(2, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), layout="constrained", squeeze=False)
    for i, (ax, run) in enumerate(zip(axes.flat, runs)):
        result = json.loads((run / "results" / "sparse.json").read_text())
        accuracy_vs_kv_read(result, title=title(run, result), ax=ax)
        if i:
            ax.get_legend().remove()
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python docs/sparse_curves.py OUT_PNG RUN [RUN ...]")
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
