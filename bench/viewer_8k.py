"""Viewer page on a long prompt: file size, open time and per-step render time in headless chromium.

Traces one NIAH sample (default: 8,000 tokens, 48 steps, top-5 positions) with the default model unless
--run names an existing run folder, writes `dynheads view`, opens it with Debian's chromium through
Playwright and times `setStep` (grid + prompt highlight + timeline) for every step and a head click.
Targets (issue 10): each step well under 1 s, file under 5 MB.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).with_name("dynheads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, help="existing run folder (default: trace one sample now)")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--synthetic", action="store_true",
                    help="no model: random records of the default model's shape (30 x 9 heads, 48 steps, top-5)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="viewer8k-")))
    args = ap.parse_args()
    run = args.run or args.out / "niah"
    page_path = args.out / "view.html"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        from dynheads.report.view import render

        page_path.write_text(render(synthetic(args.length)))
    elif args.run is None:
        subprocess.run([str(BIN), "niah", "--model", "default", "--lengths", str(args.length), "--depths", "50",
                        "--samples-per-cell", "1", "--topk", "5", "--max-new-tokens", "48", "--out", str(run),
                        "--quiet"], check=True)
    if not args.synthetic:
        subprocess.run([str(BIN), "view", str(run), "--out", str(page_path)], check=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        start = time.perf_counter()
        page.goto(page_path.resolve().as_uri())
        opened = time.perf_counter() - start
        times = page.evaluate("""() => {
            const v = window.dynheadsViewer, T = v.data.conditions[0].tokens.length, out = [];
            v.select(0, v.data.static[0][0]);
            for (let t = 0; t < T; t++) { const s = performance.now(); v.setStep(t); out.push(performance.now() - s); }
            return out; }""")
        browser.close()
    n_prompt = len(__import__("json").loads(page_path.read_text().split('application/json">')[1].split("</script>")[0])["prompt"])
    times.sort()
    print(f"prompt tokens {n_prompt}, steps {len(times)}, file {page_path.stat().st_size / 1e6:.2f} MB, "
          f"open {opened:.2f} s, step render median {times[len(times) // 2]:.1f} ms, max {times[-1]:.1f} ms")


def synthetic(length: int, steps: int = 48, layers: int = 30, heads: int = 9, k: int = 5) -> dict:
    """Page data of the shape `dynheads view` writes, filled with seeded random values."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = layers * heads
    active = rng.random((steps, n)) < 0.015
    cond = {"name": "niah", "note": "", "tokens": [f" t{i}" for i in range(steps)],
            "score": active.astype(int).ravel().tolist(), "active": [np.flatnonzero(a).tolist() for a in active],
            "ablated": None, "top1": rng.integers(0, length, steps * n).tolist(), "k": k,
            "topk_pos": rng.integers(0, length, steps * n * k).tolist(),
            "topk_weight": np.round(rng.random(steps * n * k), 3).tolist(), "windows": None}
    return {"title": "synthetic", "subtitle": f"{length} prompt tokens", "layers": layers, "heads": heads,
            "prompt": [f" w{i}" + ("\n" if i % 17 == 0 else "") for i in range(length)],
            "marks": {"needle": [[length // 2, length // 2 + 40]]}, "conditions": [cond],
            "static": [[i, 0.5] for i in range(20)], "static_source": "synthetic"}


if __name__ == "__main__":
    main()
