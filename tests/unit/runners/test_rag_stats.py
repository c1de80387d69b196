"""Dynamic RAG summaries on hand-made per-question results: means, bootstrap CIs, paired tests, table."""
import numpy as np
import pytest

from dynheads.errors import DataError
from dynheads.runners.rag import PAPER_TABLE4, format_rag_table, summarize


def _rows():
    em = {"static": [1, 0, 0, 1], "dynamic": [1, 1, 0, 1], "none": [0, 0, 0, 0]}
    f1 = {"static": [1.0, 0.5, 0.0, 1.0], "dynamic": [1.0, 1.0, 0.25, 1.0], "none": [0.0, 0.5, 0.0, 0.0]}
    cov = {"static": [0.5, 1.0, None, 0.0], "dynamic": [1.0, 1.0, 1.0, 1.0], "none": [0.0] * 4}
    return [{"strategies": {s: {"em": em[s][i], "f1": f1[s][i], "n_retrievals": (i if s != "none" else 0),
                                "support_coverage": cov[s][i], "opened_fraction": 0.1, "n_tokens": 5}
                            for s in em}} for i in range(4)]


def test_summary_means_intervals_and_paired_tests_against_static():
    out = summarize(_rows(), ["dynamic", "static", "none"], np.random.default_rng(0), n_boot=500)
    assert out["n_questions"] == 4
    st = out["strategies"]
    assert st["static"]["em"]["estimate"] == 0.5 and st["dynamic"]["f1"]["estimate"] == pytest.approx(0.8125)
    assert st["static"]["em"]["low"] <= 0.5 <= st["static"]["em"]["high"] and st["none"]["em"]["high"] == 0.0
    assert st["static"]["support_coverage"] == pytest.approx(0.5)  # None (no retrieval) left out
    assert st["static"]["support_coverage_ci"]["n"] == 3 and st["dynamic"]["support_coverage_ci"]["low"] == 1.0
    assert st["dynamic"]["retrievals_per_question"] == 1.5 and st["none"]["retrievals_per_question"] == 0
    dyn = out["vs_static"]["dynamic"]
    assert dyn["em"]["mean_difference"] == pytest.approx(0.25) and dyn["em"]["n_nonzero"] == 1
    assert dyn["f1"]["mean_difference"] == pytest.approx((0 + 0.5 + 0.25 + 0) / 4)
    assert set(out["vs_static"]) == {"dynamic", "none"}
    no_static = summarize(_rows(), ["dynamic", "none"], np.random.default_rng(0), n_boot=100)
    assert no_static["vs_static"] == {}
    with pytest.raises(DataError):
        summarize([], ["static"], np.random.default_rng(0))


def test_table_puts_ours_beside_the_paper():
    text = format_rag_table(summarize(_rows(), ["dynamic", "static", "none"], np.random.default_rng(0), 200), "smol")
    assert "paper llama3.1-8b" in text and "0.456/0.5586" in text and "0.252/0.3257" in text
    ours = next(line for line in text.splitlines() if line.startswith("ours smol (n=4)"))
    assert "0.750/0.8125" in ours and "0.500/0.6250" in ours and "0.000/0.1250" in ours
    assert "dynamic - static: F1 +0.1875" in text
    assert set(PAPER_TABLE4["llama3.1-8b"]) == {"dynamic", "static", "dynamic-random", "fixed-random", "none"}
