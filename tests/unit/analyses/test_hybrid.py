"""Hybrid-attention analysis on hand-made steps with hand-derived answers."""
import math

import numpy as np

from dynheads.analyses.hybrid import distance_classes, hybrid_stats, position_classes
from dynheads.heads import HeadLayout

LAYOUT = HeadLayout(3, 2, 1, sliding_window=10, sliding_layers=(0, 1))  # layer 2 is the global one


def test_position_classes_follow_the_window_rule():
    # query 20, window 10: keys 11..20 are visible; a needle [5, 12) straddles, [12, 15) is inside, [0, 8) beyond
    query = np.array([20, 20, 20, 20])
    first = np.array([12, 11, 5, 0])
    last = np.array([14, 14, 11, 10])
    assert position_classes(query, first, last, 10).tolist() == ["inside", "inside", "straddling", "beyond"]
    assert distance_classes(np.array([30, 30, 200]), np.array([15, 5, 0]), 10).tolist() == ["1-2W", "2-4W", "≥16W"]


def test_global_share_entropy_and_adjacent_jaccard():
    active = np.zeros((4, 3, 2), bool)
    active[0, 2, 0] = True  # sample a, step 0: one global head
    active[1, 2, 0] = active[1, 0, 1] = True  # step 1: the same global head and a sliding one
    active[2, 2, 1] = True  # sample b, step 0: the other global head
    # sample b step 1 has no active head
    ids = np.array(["a", "a", "b", "b"])
    steps = np.array([0, 1, 0, 1])
    (b,) = hybrid_stats(active, ids, steps, LAYOUT, np.array(["x"] * 4), ["x"], n_boot=50)
    assert (b.n_samples, b.n_steps, b.n_copy_steps) == (2, 4, 3)
    assert math.isclose(b.heads_per_step.estimate, 4 / 4) and math.isclose(b.heads_per_copy_step.estimate, 4 / 3)
    assert math.isclose(b.global_share.estimate, 3 / 4)  # pooled: 3 of the 4 activations are in layer 2
    p = np.array([2, 1, 1]) / 4  # L2-H0 twice, L0-H1 once, L2-H1 once
    assert math.isclose(b.entropy.estimate, float(-(p * np.log(p)).sum()))
    assert math.isclose(b.adjacent_jaccard.estimate, 1 / 2)  # only a's steps 0→1 are both copy steps
    assert (b.heads_ever_active, b.global_heads_ever_active) == (3, 2)


def test_a_bin_without_consecutive_copy_steps_has_no_adjacent_jaccard():
    """A run whose heads are almost never active (a long prompt the model does not answer): no crash, no value."""
    active = np.zeros((3, 3, 2), bool)
    active[1, 2, 0] = True  # one copy step, no neighbour that copies
    (b,) = hybrid_stats(active, np.array(["a"] * 3), np.array([0, 1, 2]), LAYOUT, np.array(["x"] * 3), ["x"],
                        n_boot=50)
    assert b.n_copy_steps == 1 and b.adjacent_jaccard.estimate is None and b.adjacent_jaccard.n == 0
