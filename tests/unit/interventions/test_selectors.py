"""Head selectors on hand-made step views: dynamic, static, static-excluding-dynamic, random, progressive."""
import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.interventions.selectors import (StepContext, build, dynamic_set, make_intervention,
                                              progressive_order, selectors)
from dynheads.tracing.tracer import StepView

L, H = 2, 4
NEEDLE = {"needle": [(10, 14)]}  # positions 10..13
IDS = np.arange(100, 120)  # token at position p is 100 + p
IDS[12] = 111  # positions 11 and 12 both hold token 111
NEEDLE_TOKENS = IDS[10:14]  # [110, 111, 111, 113]


def _view(token=111, top1_pos=None, rows=None, mass=None):
    pos = np.zeros((L, H), np.int64) if top1_pos is None else np.asarray(top1_pos)
    arrays = {"top1_pos": pos, "top1_token": IDS[pos]}
    if rows is not None:
        arrays["rows_needle"] = np.asarray(rows, np.float32)
    if mass is not None:
        arrays["mass_needle"] = np.asarray(mass, np.float32)
    return StepView(step=0, token_id=token, entropy=0.0, logprob=0.0, arrays=arrays)


def _ctx(dynamic_flat, view=None):
    dyn = np.zeros(L * H, bool)
    dyn[list(dynamic_flat)] = True
    return StepContext(view or _view(), dyn.reshape(L, H), NEEDLE_TOKENS)


def _flat(mask):
    return sorted(np.flatnonzero(mask).tolist())


def test_registry_lists_every_selector_and_rejects_unknown_names():
    assert set(selectors.names()) >= {"dynamic", "static", "static_excluding_dynamic", "random", "progressive"}
    with pytest.raises(ConfigError, match="unknown head selector 'nope'"):
        build("nope")


def test_dynamic_set_is_eq1_on_the_clean_pass():
    # heads point at: needle pos 11 (token 111 = generated) → active; pos 12 (also 111) → active;
    # pos 10 (token 110) → wrong token; pos 5 (token 105, outside the needle) → not active.
    pos = [[11, 12, 10, 5], [0, 0, 11, 13]]
    active = dynamic_set(_view(token=111, top1_pos=pos), NEEDLE)
    assert _flat(active) == [0, 1, 6]
    intervention = make_intervention(build("dynamic"), NEEDLE, IDS)
    assert _flat(intervention(_view(token=111, top1_pos=pos))) == [0, 1, 6]


def test_static_takes_the_top_of_the_ranking_with_fixed_or_step_count():
    ranking = np.array([[0.1, 0.9, 0.5, 0.5], [0.0, 0.7, 0.2, 0.3]])  # order: 1, 5, 2, 3 (tie → lower index), 7, 6, 0, 4
    assert _flat(build("static", ranking=ranking, n=3)(_ctx([]))) == [1, 2, 5]
    assert _flat(build("static", ranking=ranking, n=None)(_ctx([0, 4]))) == [1, 5]  # --match step: |D_t| = 2
    assert not build("static", ranking=ranking, n=0)(_ctx([0])).any()


def test_static_excluding_dynamic_skips_the_steps_own_dynamic_heads():
    ranking = np.array([[0.1, 0.9, 0.5, 0.5], [0.0, 0.7, 0.2, 0.3]])
    sel = build("static_excluding_dynamic", ranking=ranking, n=3)
    assert _flat(sel(_ctx([1, 5]))) == [2, 3, 7]
    step = build("static_excluding_dynamic", ranking=ranking, n=None)(_ctx([1, 2, 5]))
    assert _flat(step) == [3, 6, 7]  # as many as |D_t| = 3, none of them dynamic
    everything = build("static_excluding_dynamic", ranking=ranking, n=8)(_ctx([1, 2]))
    assert _flat(everything) == [0, 3, 4, 5, 6, 7]  # only 6 non-dynamic heads exist


def test_random_is_seeded_fixed_per_sample_and_count_matched():
    a = build("random", rng=np.random.default_rng([0, 7]), n=3)
    b = build("random", rng=np.random.default_rng([0, 7]), n=3)
    masks_a = [a(_ctx([])) for _ in range(4)]
    masks_b = [b(_ctx([])) for _ in range(4)]
    for ma, mb in zip(masks_a, masks_b):
        np.testing.assert_array_equal(ma, mb)
        assert ma.sum() == 3
    assert all(np.array_equal(m, masks_a[0]) for m in masks_a)  # one draw per sample
    others = [_flat(build("random", rng=np.random.default_rng([s, 7]), n=3)(_ctx([]))) for s in range(1, 6)]
    assert any(o != _flat(masks_a[0]) for o in others)
    per_step = build("random", rng=np.random.default_rng([0, 7]), n=3, per_step=True)
    draws = {tuple(_flat(per_step(_ctx([])))) for _ in range(10)}
    assert len(draws) > 1
    nested = build("random", rng=np.random.default_rng([0, 7]), n=None)
    small, large = _flat(nested(_ctx([0]))), _flat(nested(_ctx([0, 1, 2])))
    assert len(small) == 1 and len(large) == 3 and set(small) <= set(large)  # same permutation, first n_t


def test_progressive_order_ranks_dynamic_then_copy_attention_then_needle_mass():
    # rows_needle over needle positions 10..13 (tokens 110, 111, 111, 113); generated token 111,
    # so a head's copy attention is rows[..., 1] + rows[..., 2].
    rows = np.zeros((L, H, 4))
    rows[0, 0] = [0.9, 0.0, 0.0, 0.0]  # head 0: copy 0.0, on the needle but the wrong token
    rows[0, 1] = [0.0, 0.1, 0.1, 0.0]  # head 1: copy 0.2
    rows[0, 2] = [0.0, 0.3, 0.0, 0.0]  # head 2: copy 0.3
    rows[0, 3] = [0.0, 0.0, 0.05, 0.0]  # head 3: copy 0.05
    rows[1, 0] = [0.0, 0.0, 0.6, 0.0]  # head 4: copy 0.6
    rows[1, 1] = [0.0, 0.0, 0.0, 0.0]  # head 5: nothing
    rows[1, 2] = [0.0, 0.0, 0.0, 0.4]  # head 6: copy 0.0, mass 0.4
    rows[1, 3] = [0.0, 0.0, 0.0, 0.0]  # head 7: nothing
    mass = rows.sum(-1)
    view = _view(token=111, rows=rows, mass=mass)
    ctx = _ctx([3, 1], view)  # dynamic heads 1 (copy 0.2) and 3 (copy 0.05)
    # dynamic first by copy attention: 1, 3; then the rest by copy attention: 4 (0.6), 2 (0.3);
    # then copy 0 ordered by needle mass: 0 (0.9), 6 (0.4); then the ties by index: 5, 7.
    assert progressive_order(ctx).tolist() == [1, 3, 4, 2, 0, 6, 5, 7]
    for k, expected in [(0, []), (1, [1]), (3, [1, 3, 4]), (5, [0, 1, 2, 3, 4]), (8, list(range(8)))]:
        assert _flat(build("progressive", k=k)(ctx)) == expected


def test_progressive_needs_the_needle_rows():
    with pytest.raises(ConfigError, match="rows_needle"):
        build("progressive", k=2)(_ctx([1]))


def test_build_passes_only_declared_arguments():
    sel = build("dynamic", ranking=np.zeros((L, H)), n=3, rng=None, k=4)
    assert _flat(sel(_ctx([2, 5]))) == [2, 5]
