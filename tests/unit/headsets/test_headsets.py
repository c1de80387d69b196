"""Head sets on hand-made steps: every built-in, both units, the commands' names for them, and the callbacks
the tracer gets (ablation intervention, head-sparse policy); values derived by hand."""
import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.headsets import apply
from dynheads.headsets.base import IN_LAYER, Budget, HeadSet, Step, build, head_sets, top_k
from dynheads.headsets.builtin import progressive_order
from dynheads.headsets.names import ABLATION, RAG, SPARSE, aliases
from dynheads.registry import Spec
from dynheads.scores.base import get_score
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample
from dynheads.tracing.tracer import StepView

LAYOUT = HeadLayout(2, 4, 2)  # 2 layers × 4 query heads; KV groups of 2 → 2 × 2 KV units
NEEDLE = {"needle": [(10, 14)]}  # positions 10..13
IDS = np.arange(100, 120)  # token at position p is 100 + p
IDS[12] = 111  # positions 11 and 12 both hold token 111
SAMPLE = EncodedSample(Sample("s1", "", "", "", {}, PromptFormat(None, "{context}")), IDS.tolist(), NEEDLE, (0, 20), "")
RANKING = np.array([[0.1, 0.9, 0.5, 0.5], [0.0, 0.7, 0.2, 0.3]])  # order: 1, 5, 2, 3 (tie → lower index), 7, 6, 0, 4


def _view(token=111, top1_pos=None, rows=None, mass=None, hidden=None, step=0):
    pos = np.zeros((2, 4), np.int64) if top1_pos is None else np.asarray(top1_pos)
    arrays = {"top1_pos": pos, "top1_token": IDS[pos]}
    if rows is not None:
        arrays["rows_needle"] = np.asarray(rows, np.float32)
    if mass is not None:
        arrays["mass_needle"] = np.asarray(mass, np.float32)
    return StepView(step=step, token_id=token, entropy=0.0, logprob=0.0, arrays=arrays, hidden=hidden)


def _active(*flat):
    mask = np.zeros(8, bool)
    mask[list(flat)] = True
    return mask.reshape(2, 4)


def _flat(mask):
    return sorted(np.flatnonzero(mask).tolist())


def _at(heads: HeadSet, t=0, **known):
    return heads.at(t, LAYOUT, **{"current": _view(), "sample": SAMPLE, **known})


def test_registry_lists_every_head_set_and_rejects_unknown_names():
    assert head_sets.names() == ["all", "dynamic", "layerwise", "none", "oracle", "predicted", "progressive", "query", "random", "static",
                                 "static_excluding_dynamic"]
    with pytest.raises(ConfigError, match="unknown head set 'nope'"):
        build("nope")
    with pytest.raises(ConfigError, match="head set 'static' has no argument 'k'"):
        build(Spec("static", {"k": 3}))


def test_dynamic_is_the_steps_own_eq1_set_and_the_ablation_intervention_masks_it():
    # heads point at: needle pos 11 (token 111 = generated) → active; pos 12 (also 111) → active;
    # pos 10 (token 110) → wrong token; pos 5 (token 105, outside the needle) → not active.
    view = _view(token=111, top1_pos=[[11, 12, 10, 5], [0, 0, 11, 13]])
    score = get_score("copy_paste").with_args(span="needle")
    scores, active = score.on_step(view, NEEDLE)
    assert _flat(active) == [0, 1, 6] and scores.dtype == np.float32
    assert _flat(_at(build("dynamic", k=3), active=active)) == [0, 1, 6]  # |D_t| whatever k
    mask = apply.intervention(build("dynamic"), SAMPLE, LAYOUT, score)(view)
    assert _flat(mask) == [0, 1, 6]


def test_static_takes_the_top_of_the_ranking_with_fixed_or_step_count():
    assert _flat(_at(build("static", k=3, ranking=RANKING))) == [1, 2, 5]
    assert _flat(_at(build("static", ranking=RANKING), active=_active(0, 4))) == [1, 5]  # k None: |D_t| = 2
    assert not _at(build("static", k=0, ranking=RANKING)).any()
    with pytest.raises(ConfigError, match="needs a ranking"):
        build("static")
    with pytest.raises(ConfigError, match="needs the step's active"):
        _at(build("static", ranking=RANKING))  # k = |D_t| with no D_t given


def test_static_excluding_dynamic_skips_the_steps_own_dynamic_heads():
    assert _flat(_at(build("static_excluding_dynamic", k=3, ranking=RANKING), active=_active(1, 5))) == [2, 3, 7]
    step = _at(build("static_excluding_dynamic", ranking=RANKING), active=_active(1, 2, 5))
    assert _flat(step) == [3, 6, 7]  # as many as |D_t| = 3, none of them dynamic
    everything = _at(build("static_excluding_dynamic", k=8, ranking=RANKING), active=_active(1, 2))
    assert _flat(everything) == [0, 3, 4, 5, 6, 7]  # only 6 non-dynamic heads exist


def test_random_is_seeded_fixed_per_generation_or_redrawn_per_step():
    rng_a, rng_b = np.random.default_rng([0, 7]), np.random.default_rng([0, 7])
    a, b = build("random", k=3), build("random", k=3)
    masks_a = [_at(a, t, rng=rng_a) for t in range(4)]
    masks_b = [_at(b, t, rng=rng_b) for t in range(4)]
    for ma, mb in zip(masks_a, masks_b):
        np.testing.assert_array_equal(ma, mb)
        assert ma.sum() == 3
    assert all(np.array_equal(m, masks_a[0]) for m in masks_a)  # one draw per generation
    assert _flat(masks_a[0]) == _flat(np.isin(np.arange(8), np.random.default_rng([0, 7]).permutation(8)[:3]))
    per_step = build("random", k=3, per_step=True)
    rng = np.random.default_rng([0, 7])
    assert len({tuple(_flat(_at(per_step, t, rng=rng))) for t in range(10)}) > 1
    nested, rng = build("random"), np.random.default_rng([0, 7])
    small, large = _flat(_at(nested, rng=rng, active=_active(0))), _flat(_at(nested, rng=rng, active=_active(0, 1, 2)))
    assert len(small) == 1 and len(large) == 3 and set(small) <= set(large)  # same permutation, first |D_t|
    with pytest.raises(ConfigError, match="needs the step's rng"):
        _at(build("random", k=1))


def test_progressive_order_ranks_dynamic_then_copy_attention_then_needle_mass():
    # rows_needle over needle positions 10..13 (tokens 110, 111, 111, 113); generated token 111,
    # so a head's copy attention is rows[..., 1] + rows[..., 2].
    rows = np.zeros((2, 4, 4))
    rows[0, 0] = [0.9, 0.0, 0.0, 0.0]  # head 0: copy 0.0, on the needle but the wrong token
    rows[0, 1] = [0.0, 0.1, 0.1, 0.0]  # head 1: copy 0.2
    rows[0, 2] = [0.0, 0.3, 0.0, 0.0]  # head 2: copy 0.3
    rows[0, 3] = [0.0, 0.0, 0.05, 0.0]  # head 3: copy 0.05
    rows[1, 0] = [0.0, 0.0, 0.6, 0.0]  # head 4: copy 0.6
    rows[1, 2] = [0.0, 0.0, 0.0, 0.4]  # head 6: copy 0.0, mass 0.4 (heads 5 and 7: nothing)
    view = _view(token=111, rows=rows, mass=rows.sum(-1))
    step = Step(0, LAYOUT, Budget(), current=view, active=_active(3, 1), sample=SAMPLE)  # D_t: heads 1 and 3
    # dynamic first by copy attention: 1, 3; then the rest by copy attention: 4 (0.6), 2 (0.3);
    # then copy 0 ordered by needle mass: 0 (0.9), 6 (0.4); then the ties by index: 5, 7.
    assert progressive_order(step).tolist() == [1, 3, 4, 2, 0, 6, 5, 7]
    for k, expected in [(0, []), (1, [1]), (3, [1, 3, 4]), (5, [0, 1, 2, 3, 4]), (8, list(range(8)))]:
        assert _flat(_at(build("progressive", k=k), current=view, active=_active(3, 1))) == expected
    with pytest.raises(ConfigError, match="rows_needle"):
        _at(build("progressive", k=2), active=_active(1))


def test_kv_units_take_the_max_over_each_group_and_ties_go_to_the_lower_index():
    step = Step(0, LAYOUT, Budget(2, "kv"))
    assert step.shape == (2, 2) and step.group == 2
    np.testing.assert_array_equal(step.units(RANKING), [[0.9, 0.5], [0.7, 0.3]])
    np.testing.assert_array_equal(top_k(np.array([[1.0, 2.0], [2.0, 0.0]]), 2), [[False, True], [True, False]])
    with pytest.raises(ConfigError, match="unknown head unit 'layer'"):
        Budget(1, "layer")


def test_all_none_and_static_in_kv_units():
    ranking = np.array([[0.1, 0.9, 0.0, 0.2], [0.5, 0.0, 0.3, 0.8]])
    full = build("all", k=1, unit="kv").at(0, LAYOUT)
    none = build("none", unit="kv").at(3, LAYOUT)
    static = build("static", k=2, unit="kv", ranking=ranking).at(0, LAYOUT)
    assert full.shape == (2, 2) and full.all() and not none.any()
    np.testing.assert_array_equal(static, [[True, False], [False, True]])  # units 0.9 and 0.8
    assert build("all").constant is True and build("none").constant is False and build("static", ranking=ranking).constant is None


def test_oracle_opens_the_steps_dynamic_set_filled_and_cut_by_score_then_mass():
    active = _active(7)  # D_t: query head 3 of layer 1 → unit (1, 1)
    score = np.array([[0.0, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0]])
    view = _view(mass=[[0.0, 0.6, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0]])
    oracle = build("oracle", k=2, unit="kv")
    assert apply.needs_full_pass(oracle)
    np.testing.assert_array_equal(_at(oracle, current=view, scores=score, active=active), [[False, True], [False, True]])
    three = _at(build("oracle", k=3, unit="kv"), current=view, scores=score, active=active)
    np.testing.assert_array_equal(three, [[False, True], [True, True]])  # then by needle mass: unit (1, 0)
    every = np.ones((2, 4), bool)  # more active units than k: cut by the same keys
    np.testing.assert_array_equal(_at(oracle, current=view, scores=score, active=every), [[False, True], [False, True]])


class _Probe:
    def predict(self, hidden):
        return np.array([[hidden[0], 0, 0, 0], [0, 0, 0.5, 0]])


def test_predicted_from_the_previous_step_opens_the_probe_top_k_and_the_static_set_at_step_zero():
    ranking = np.array([[0.1, 0.9, 0.0, 0.2], [0.5, 0.0, 0.3, 0.8]])
    heads = build("predicted", k=1, unit="kv", ranking=ranking, predictor=_Probe())
    assert not apply.needs_full_pass(heads)
    np.testing.assert_array_equal(heads.at(0, LAYOUT), [[True, False], [False, False]])  # static top-1
    np.testing.assert_array_equal(heads.at(1, LAYOUT, previous=_view(hidden=np.array([0.1]))),
                                  [[False, False], [False, True]])
    np.testing.assert_array_equal(heads.at(1, LAYOUT, previous=_view(hidden=np.array([0.9]))),
                                  [[True, False], [False, False]])
    with pytest.raises(ConfigError, match="needs a predictor"):
        build("predicted", k=1, ranking=ranking, predictor=None)


def test_predicted_from_the_current_step_is_the_rag_regressor_on_the_identification_step():
    heads = build(RAG.get("dynamic"), k=2, predictor=_Probe())
    assert apply.needs_full_pass(heads)
    assert _flat(heads.at(0, LAYOUT, current=_view(hidden=np.array([0.9])))) == [0, 6]  # 0.9, then 0.5
    assert _flat(heads.at(0, LAYOUT, current=_view(hidden=np.array([0.1])))) == [0, 6]  # 0.5, then 0.1 (ties: 0)
    with pytest.raises(ConfigError, match="needs the step's hidden state"):
        heads.at(0, LAYOUT, current=_view())


def test_each_commands_names_map_onto_the_registry():
    assert {n: (s.name, s.args) for n, s in ((n, SPARSE.get(n)) for n in SPARSE.names())} == {
        "full": ("all", {}), "streaming": ("none", {}), "static": ("static", {}),
        "random": ("random", {"per_step": True}), "oracle": ("oracle", {}),
        "predicted": ("predicted", {"source": "previous"}), "query": ("query", {}),
        "layerwise": ("layerwise", {})}
    assert {n: (s.name, s.args) for n, s in ((n, RAG.get(n)) for n in RAG.names())} == {
        "dynamic": ("predicted", {"source": "current"}), "static": ("static", {}),
        "dynamic-random": ("random", {"per_step": True}), "fixed-random": ("random", {"per_step": False}),
        "none": ("none", {}), "full": ("all", {})}
    assert ABLATION.names() == ["dynamic", "none", "progressive", "random", "static", "static_excluding_dynamic"]
    assert aliases("none") == ["ablate none", "rag --heads none", "sparse --policies streaming"]
    with pytest.raises(ConfigError, match="unknown head strategy 'oracle'"):
        RAG.get("oracle")
    with pytest.raises(ConfigError, match="unknown head policy 'psychic'"):
        SPARSE.get("psychic")
    # the spec's own arguments win over what the caller makes available (ablate passes --random-per-step)
    fixed = build(RAG.get("fixed-random"), k=2, per_step=True)
    rng = np.random.default_rng(3)
    assert len({tuple(_flat(_at(fixed, t, rng=rng))) for t in range(5)}) == 1


def test_the_decoding_policy_sees_t_the_previous_step_the_dense_pass_and_a_generator_per_step():
    seen = []

    def record(step):
        seen.append((step.t, step.previous, step.current, step.scores, step.active, step.span, step.rng))
        return np.zeros(step.shape, bool)

    heads = HeadSet("probe", record, budget=Budget(2, "kv"))
    score = get_score("copy_paste")
    rngs = {t: np.random.default_rng(t) for t in range(3)}
    policy = apply.decoding_policy(heads, SAMPLE, LAYOUT, score, "needle", rngs.__getitem__)
    prev, full = _view(step=0), _view(token=111, top1_pos=[[11, 0, 0, 0], [0, 0, 0, 0]], step=1)
    assert policy(0, None, None).shape == (2, 2)
    policy(1, prev, full)
    assert seen[0][:5] == (0, None, None, None, None) and seen[0][6] is rngs[0]
    t, previous, current, scores, active, span, rng = seen[1]
    assert (t, previous, current, span, rng) == (1, prev, full, "needle", rngs[1])
    assert _flat(active) == [0] and scores[0, 0] == 1.0


def test_a_head_set_that_decides_inside_the_layer_is_refused_by_ablation_and_rag():
    inside = HeadSet("query", lambda step: np.ones(step.shape, bool), decides=IN_LAYER)
    for call in (lambda: apply.intervention(inside, SAMPLE, LAYOUT, get_score("copy_paste")),
                 lambda: apply.check_decides(inside, "Dynamic RAG")):
        with pytest.raises(ConfigError, match="decides per layer inside the forward pass"):
            call()
    # head-sparse decoding asks it per layer: the policy returns the layer decision the attention calls
    decide = apply.decoding_policy(inside, SAMPLE, LAYOUT, get_score("copy_paste"), "needle",
                                   lambda t: np.random.default_rng(t))(0, None, None)
    assert callable(decide) and decide(1, None).all()


def test_ablation_masks_query_heads_only():
    with pytest.raises(ConfigError, match="ablation masks query heads"):
        apply.intervention(build("dynamic", unit="kv"), SAMPLE, LAYOUT, get_score("copy_paste"))
