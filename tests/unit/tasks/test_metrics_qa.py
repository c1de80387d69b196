"""SQuAD/HotpotQA-style EM and F1 and answer extraction on hand-made cases."""
from __future__ import annotations

import pytest

from dynheads.tasks.metrics import exact_match, extract_answer, f1_score, normalize_answer


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Beatles", "Beatles") == 1.0
    assert exact_match("Beatles!", ["Rolling Stones", "The Beatles"]) == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0
    assert exact_match("anything", []) == 0.0


def test_f1_hand_values():
    # pred "new york city" vs gold "new york": common 2, P = 2/3, R = 1 → F1 = 0.8
    assert f1_score("New York City", "New York") == pytest.approx(0.8)
    # pred "paris" vs "paris france" (P 1, R 1/2 → 2/3) and vs "paris" (1.0): max is taken
    assert f1_score("Paris", ["Paris, France", "paris"]) == pytest.approx(1.0)
    assert f1_score("Paris", ["Paris, France"]) == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred "x y y", gold "y y y" → common 2, P 2/3, R 2/3
    assert f1_score("x y y", "y y y") == pytest.approx(2 / 3)
    assert f1_score("London", "Paris") == 0.0


def test_yes_no_guard():
    assert f1_score("yes", "no") == 0.0
    assert f1_score("yes it is", "yes") == 0.0  # gold is yes/no: only an exact yes scores
    assert f1_score("no", "no way") == 0.0  # prediction is yes/no: must equal the gold
    assert f1_score("No.", "no") == 1.0


@pytest.mark.parametrize("response, answer", [
    ("Paris", "Paris"),
    ("Answer: Paris.", "Paris"),
    ("Yes. He was born in 1990.", "Yes"),
    ("U.S. Army", "U.S. Army"),
    ("J. K. Rowling wrote it.", "J. K. Rowling wrote it"),
    ("He was French. So the answer is Barack Obama. Because", "Barack Obama"),
    ("Reasoning first.\nThus, THE ANSWER IS: \"Chief of Protocol\".\nDone", "Chief of Protocol"),
    ("\n\n  Chief of Protocol\nmore text", "Chief of Protocol"),
    ("", ""),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer
