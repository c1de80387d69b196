"""The viewer and the report in a real browser (Debian's chromium driven by Playwright), on default-model runs.

One tiny reproduction (NIAH at 300 tokens, dynamism, CCA, one ablation sample) feeds both tests; the
page's state is compared with the run's records, and screenshots land in the test's tmp_path.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from e2e.helpers import dynheads

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make setup installs it)")]


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "r"
    proc = dynheads("reproduce", "--model", "default", "--out", out, "--steps", "niah,dynamism,cca,ablation",
                    "--niah-lengths", "300", "--niah-per-cell", "1", "--ablation-lengths", "300",
                    "--ablation-depths", "50", "--ablation-per-cell", "1", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    return out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def _page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    return page, errors


def _ints(page, selector, attr):
    return sorted(int(x) for x in page.eval_on_selector_all(selector, f"els => els.map(e => e.dataset.{attr})"))


def test_viewer_shows_the_records_of_a_niah_run(repro, browser, tmp_path):
    run = repro / "niah"
    sample = sorted((run / "samples").glob("*.json"))[0].stem
    proc = dynheads("view", run, "--sample", sample, "--out", tmp_path / "view.html")
    assert proc.returncode == 0, proc.stderr
    rec = np.load(run / "records" / f"{sample}.npz")
    n_prompt = json.loads((run / "samples" / f"{sample}.json").read_text())["prompt_tokens"]
    active = rec["score"] >= 1  # Eq. 1 is binary
    n_heads = active.shape[2]
    page, errors = _page(browser, tmp_path / "view.html")
    steps = [t for t in range(len(active)) if active[t].any()][:3]
    assert steps, "the run has no step with a retrieval head"
    for t in steps:
        page.evaluate(f"window.dynheadsViewer.setStep({t})")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowLeft")  # the keys move one step and back
        assert page.locator(".atok.cur").get_attribute("data-step") == str(t)
        assert _ints(page, ".cell.dt", "f") == np.flatnonzero(active[t].reshape(-1)).tolist()
        flat = int(np.flatnonzero(active[t].reshape(-1))[0])
        page.locator(f".cell[data-c='0'][data-f='{flat}']").click()
        l, h = divmod(flat, n_heads)
        assert _ints(page, ".tok.top1", "pos") == [int(rec["top1_pos"][t, l, h])]
        want = {int(p) for p in rec["topk_pos"][t, l, h] if p < n_prompt} - {int(rec["top1_pos"][t, l, h])}
        assert set(_ints(page, ".tok.topk", "pos")) - {int(rec["top1_pos"][t, l, h])} == want
        assert page.locator(".tok.top1").is_visible()  # scrolled into view
    page.screenshot(path=str(tmp_path / "viewer.png"))
    assert not errors

    abl = repro / "ablation"
    sample = sorted((abl / "samples").glob("*.json"))[0].stem
    assert dynheads("view", abl, "--out", tmp_path / "ablation.html").returncode == 0
    rec = np.load(abl / "records" / f"{sample}.npz")
    page, errors = _page(browser, tmp_path / "ablation.html")
    names = page.eval_on_selector_all(".cond h3", "els => els.map(e => e.textContent.split(' ')[0])")
    assert names == ["none", "dynamic", "static", "static_excluding_dynamic", "random"]
    assert _ints(page, ".cell.abl[data-c='1']", "f") == np.flatnonzero(rec["dynamic__ablated"][0].reshape(-1)).tolist()
    page.screenshot(path=str(tmp_path / "viewer_ablation.png"), full_page=True)
    assert not errors


def test_report_figures_load_and_tables_have_rows(repro, browser, tmp_path):
    assert dynheads("report", repro).returncode == 0  # rebuilt from the result files alone
    page, errors = _page(browser, repro / "report.html")
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.src.slice(0, 5)])")
    assert len(images) >= 3  # Fig. 1, Fig. 2, Fig. 4
    assert all(done and width > 0 and src == "data:" for done, width, src in images), images
    rows = page.eval_on_selector_all("table", "els => els.map(t => t.querySelectorAll('tbody tr').length)")
    assert len(rows) >= 5 and min(rows) > 0, rows
    verdicts = page.eval_on_selector_all("#verdicts + table tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")
    assert len(verdicts) == 4 and set(verdicts) <= {"reproduced", "not reproduced", "not comparable"}
    links = page.eval_on_selector_all("[src],[href]", "els => els.map(e => e.getAttribute('src') || e.getAttribute('href'))")
    assert not [u for u in links if not u.startswith("data:")], "report.html must not load anything from outside"
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert not errors


def test_comparison_report_puts_reproductions_side_by_side(repro, browser, tmp_path):
    proc = dynheads("report", repro, repro, "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| statistic | paper (llama3.1-8b) | default | default (2) |" in md  # each reproduction named by its model
    page, errors = _page(browser, tmp_path / "cmp" / "report.html")
    captions = page.eval_on_selector_all("caption", "els => els.map(e => e.textContent)")
    assert [c.split(" —")[0].split(" (")[0] for c in captions] == ["Claim 1", "Claim 2", "Claim 3", "Dynamic RAG"]
    verdicts = page.eval_on_selector_all("tbody tr:last-child td:nth-child(3)", "els => els.map(e => e.textContent)")
    assert len(verdicts) == 4 and all(v.split(":")[0] in {"reproduced", "not reproduced", "not comparable"}
                                      for v in verdicts)
    one = dynheads("report", repro, "--out", tmp_path / "one")
    assert one.returncode == 2 and "compare several reproductions" in one.stderr
    assert not errors
