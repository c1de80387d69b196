"""Pure parts of multi-hop detection runs: the registered Eq. 2 score, answer metrics, the Fig. 6 grid."""
import numpy as np
import pytest

from dynheads.runners.trace import fig6_table, format_fig6_table, score_answer
from dynheads.scores.base import get_score
from dynheads.scores.reasoning import reasoning_score
from dynheads.tasks.base import PromptFormat, Sample


def test_reasoning_is_a_registered_head_score():
    score = get_score("reasoning")
    assert score.needs == ("mass_support", "context_mass") and score.mass_spans == ("support",)
    assert score.threshold == 0.1
    rng = np.random.default_rng(0)
    arrays = {"mass_support": rng.random((3, 2, 4)) * 0.2, "context_mass": rng.random((3, 2, 4))}
    out = score(arrays, {"support": [(0, 1)]})
    np.testing.assert_array_equal(out, reasoning_score(arrays["mass_support"], arrays["context_mass"]))
    assert out.dtype == np.float32 and score.active(out).dtype == bool


def test_score_answer_extracts_then_scores():
    sample = Sample("s", "c", "q", ["Chief of Protocol", "chief"], {}, PromptFormat(None, "{context}"))
    out = score_answer("Reasoning first.\nSo the answer is Chief of Protocol.", sample)
    assert out == {"prediction": "Chief of Protocol", "em": 1.0, "f1": 1.0, "accuracy": 1.0}
    assert score_answer("The Chief", sample)["em"] == 1.0  # "the" is an article; max over gold answers
    out = score_answer("Protocol", sample)
    assert out["em"] == 0.0 and out["accuracy"] == 0.0 and out["f1"] == pytest.approx(0.5)


def test_fig6_grid_counts_and_means():
    rows = [(100, 3.0, 1.0), (400, 9.9, 0.0), (600, 50.0, 0.5), (3999, 100.0, 0.25), (4000, 50.0, 1.0),
            (300, float("nan"), 1.0)]
    t = fig6_table(rows)
    assert t.length_centres[0] == 250 and t.length_centres[-1] == 3750 and t.depth_centres[0] == 5.0
    assert t.n[0][0] == 2 and t.mean_f1[0][0] == 0.5  # 100 and 400 tokens, depths 3 and 9.9
    assert t.n[1][5] == 1 and t.mean_f1[1][5] == 0.5
    assert t.n[7][9] == 1 and t.mean_f1[7][9] == 0.25  # depth 100 falls in the last bin
    assert t.n_outside == 2 and t.mean_f1[2][2] is None  # 4000 tokens and NaN depth are off the grid
    text = format_fig6_table(t.__dict__)
    assert " 2:0.50" in text and "2 samples outside the grid" in text
