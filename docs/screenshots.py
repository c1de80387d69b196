"""Screenshots of a report.html and a viewer page for the README (Debian's chromium through Playwright).

usage: python docs/screenshots.py REPORT_HTML VIEW_HTML OUT_DIR
Writes OUT_DIR/report.png (the top of the report: verdicts, Table 1) and OUT_DIR/viewer.png (the viewer
after stepping to the first step with a retrieval head and clicking its first head).
"""
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(report: Path, view: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(report.resolve().as_uri())
        page.screenshot(path=str(out / "report.png"))
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(view.resolve().as_uri())
        page.evaluate("""() => { const v = window.dynheadsViewer, c = v.data.conditions[0];
            const t = c.active.findIndex(a => a.length > 0);
            if (t >= 0) { v.setStep(t + 2 < c.active.length && c.active[t + 2].length ? t + 2 : t);
                          v.select(0, c.active[v.state.step][0]); } }""")
        page.screenshot(path=str(out / "viewer.png"))
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
