"""The `query` head set decides inside the step: every head open = plain generation, none = streaming, and the
per-layer decisions it records are the ones the attention applied (a before-step replay gives the same tokens)."""
import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from dynheads.headsets import apply
from dynheads.headsets.base import IN_LAYER, build
from dynheads.headsets.in_step import decision_read, layer_pull
from dynheads.registry import Spec
from dynheads.scores.base import get_score
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample
from dynheads.tracing.page_bounds import PageSummaries
from dynheads.tracing.sparse import LayerInput, Sparsity
from dynheads.tracing.tracer import TraceConfig, Tracer

PROMPT_LEN, NEW = 80, 10
SPARSITY = Sparsity(4, 8)


def _ids(seed=2):
    return torch.randint(3, 97, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(lm, threshold):
    heads = build(Spec("query", {} if threshold is None else {"threshold": threshold}), unit="kv")
    sample = EncodedSample(Sample("s", "", "", "", {}, PromptFormat(None, "{context}")), _ids(), {}, (0, PROMPT_LEN), "")
    policy = apply.decoding_policy(heads, sample, lm.layout, get_score("copy_paste"), "needle",
                                   lambda t: np.random.default_rng(t))
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
    return tracer, tracer.generate(tracer.prefill(_ids()), heads=policy, sparsity=SPARSITY)


def test_every_head_open_is_plain_generation_and_none_is_streaming():
    lm = make_tiny_lm("llama")
    plain = Tracer(lm, TraceConfig(max_new_tokens=NEW))
    expected = plain.generate(plain.prefill(_ids()))
    _, opened = _generate(lm, float("-inf"))
    assert opened.token_ids == expected.token_ids and np.all(opened.open_heads)
    assert [s.logprob for s in opened.steps] == [s.logprob for s in expected.steps]
    tracer, closed = _generate(lm, None)  # no threshold: nothing opens
    assert not np.any(closed.open_heads)
    streaming = tracer.generate(tracer.prefill(_ids()), heads=lambda t, p, f: np.zeros((2, 2), bool), sparsity=SPARSITY)
    assert closed.token_ids == streaming.token_ids


def test_recorded_decisions_are_the_ones_applied():
    lm = make_tiny_lm("llama")
    assert build(Spec("query", {"threshold": 0.0}), unit="kv").decides == IN_LAYER
    # the tiny model's logits are near 0, so every pull is near -log(S + W) = -2.48: -2.3 opens some heads, not all
    tracer, traced = _generate(lm, -2.3)
    opened = np.stack(traced.open_heads)
    assert 0 < opened.sum() < opened.size
    assert len({o.tobytes() for o in opened}) > 1  # decided per step and layer, not fixed
    replay = tracer.generate(tracer.prefill(_ids()), heads=lambda t, p, f: traced.open_heads[t], sparsity=SPARSITY)
    assert replay.token_ids == traced.token_ids
    assert [s.logprob for s in replay.steps] == [s.logprob for s in traced.steps]


def test_layer_pull_is_the_page_bound_per_query_head():
    summaries = PageSummaries(16)
    key = torch.randn(1, 2, 60, 8, generator=torch.Generator().manual_seed(0))
    query = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(1))
    pulls = layer_pull(LayerInput(query, key, 8 ** -0.5, 0, SPARSITY), 0, summaries)
    assert pulls.shape == (4,) and np.isfinite(pulls).all()
    assert summaries.layers[0].n_keys == 60


def test_decision_read_counts_far_pages_against_the_whole_cache():
    assert decision_read(1000, 16, 16, 64) == pytest.approx(((1000 - 64 + 15) // 16 - 1) / 1000)
    assert decision_read(70, 16, 16, 64) == 0.0


def _layer_probe(lm, layer: int, seed: int = 0):
    """A linear probe from layer `layer` + 1's attention input to per-head scores of the layers above `layer`."""
    from dynheads.analyses.probes import Probe, build_mlp

    d, shape = lm.model.config.hidden_size, (lm.layout.n_layers - layer - 1, lm.layout.n_heads)
    torch.manual_seed(seed)
    model = build_mlp(d, (), int(np.prod(shape)), 0.0).eval()
    arch = {"d_in": d, "sizes": [], "d_out": int(np.prod(shape)), "dropout": 0.0, "activation": "relu"}
    return Probe(model, np.zeros(d, np.float32), np.ones(d, np.float32), shape, "regress", 0, None, None, arch,
                 {"layer": layer})


def test_layerwise_keeps_static_below_the_probe_layer_and_probes_the_steps_own_residual_above():
    """Layers <= l: the static top-k there; above l: the top of the probe on layer l + 1's attention input of the
    same step (captured here by an independent pre-hook), filling the budget to exactly k units per step."""
    from dynheads.headsets.base import top_k

    lm = make_tiny_lm("llama")
    probe, k = _layer_probe(lm, 0), 2
    ranking = np.array([[5.0, 0.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0]])  # [layers, query heads]: unit 0 of each layer
    heads = build(Spec("layerwise"), k=k, unit="kv", layer_probe=probe, ranking=ranking)
    assert heads.decides == IN_LAYER
    sample = EncodedSample(Sample("s", "", "", "", {}, PromptFormat(None, "{context}")), _ids(), {}, (0, PROMPT_LEN), "")
    policy = apply.decoding_policy(heads, sample, lm.layout, get_score("copy_paste"), "needle",
                                   lambda t: np.random.default_rng(t))
    seen: list[torch.Tensor] = []
    attn = [m for m in lm.model.modules() if getattr(m, "layer_idx", None) == 1 and hasattr(m, "q_proj")][0]
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"][0, -1].clone()),
                                            with_kwargs=True)
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
    state = tracer.prefill(_ids())
    seen.clear()
    traced = tracer.generate(state, heads=policy, sparsity=SPARSITY)
    handle.remove()
    opened = np.stack(traced.open_heads)
    assert (opened.reshape(len(opened), -1).sum(1) == k).all()  # exactly k units at every step
    assert (opened[:, 0] == [True, False]).all()  # layer 0 <= l: the static set's unit there
    for step, residual in zip(opened, seen):
        scores = probe.predict(residual.numpy()).reshape(-1, 2).max(-1)  # per KV unit of layer 1
        assert (step[1] == top_k(scores, k - 1)).all()
    assert len({o.tobytes() for o in opened}) > 1  # the probe moves with the step
    replay = tracer.generate(tracer.prefill(_ids()), heads=lambda t, p, f: traced.open_heads[t], sparsity=SPARSITY)
    assert replay.token_ids == traced.token_ids


def test_layerwise_needs_a_probe_and_a_ranking():
    from dynheads.errors import ConfigError

    with pytest.raises(ConfigError, match="layer probe"):
        build(Spec("layerwise"), k=2, unit="kv", ranking=np.zeros((2, 4)))


def test_decision_read_counts_the_refined_pages_keys():
    far = (1000 - 64 + 15) // 16 - 1  # far pages at 1000 keys, S = 16, W = 64
    assert decision_read(1000, 16, 16, 64, refine=4, group=3) == pytest.approx((far + 4 * 3 * 16 / 2) / 1000)


def test_a_fitted_query_scorer_combines_the_units_base_rate_with_its_pull():
    """A prior-only scorer opens the same units at every step (those whose base rate beats the threshold); a
    pull-only scorer is the refined pull itself; the JSON round trip keeps it."""
    from dynheads.headsets.in_step import QueryScorer

    lm = make_tiny_lm("llama")
    prior = np.array([[2.0, -3.0], [-3.0, 1.0]])
    only_prior = QueryScorer(prior, np.zeros((2, 2)), (1.0, 0.0, 0.0), 0.0, refine=2, page=16)
    assert QueryScorer.from_json(only_prior.to_json()).to_json() == only_prior.to_json()
    heads = build(Spec("query", {"threshold": 0.0}), unit="kv", query_scorer=only_prior)
    sample = EncodedSample(Sample("s", "", "", "", {}, PromptFormat(None, "{context}")), _ids(), {}, (0, PROMPT_LEN), "")
    policy = apply.decoding_policy(heads, sample, lm.layout, get_score("copy_paste"), "needle",
                                   lambda t: np.random.default_rng(t))
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
    traced = tracer.generate(tracer.prefill(_ids()), heads=policy, sparsity=SPARSITY)
    assert (np.stack(traced.open_heads) == (prior > 0)).all()
    only_pull = QueryScorer(prior, np.full((2, 2), 0.5), (0.0, 1.0, 0.0), 0.0)
    assert only_pull.score(np.array([0.25, -np.inf]), 1).tolist() == [0.25, 0.5 - 50.0]


def test_layerwise_with_every_unit_in_the_budget_is_plain_generation():
    lm = make_tiny_lm("llama")
    heads = build(Spec("layerwise"), k=4, unit="kv", layer_probe=_layer_probe(lm, 0), ranking=np.ones((2, 4)))
    sample = EncodedSample(Sample("s", "", "", "", {}, PromptFormat(None, "{context}")), _ids(), {}, (0, PROMPT_LEN), "")
    policy = apply.decoding_policy(heads, sample, lm.layout, get_score("copy_paste"), "needle",
                                   lambda t: np.random.default_rng(t))
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
    traced = tracer.generate(tracer.prefill(_ids()), heads=policy, sparsity=SPARSITY)
    plain = Tracer(lm, TraceConfig(max_new_tokens=NEW))
    expected = plain.generate(plain.prefill(_ids()))
    assert np.all(traced.open_heads) and traced.token_ids == expected.token_ids
    assert [s.logprob for s in traced.steps] == [s.logprob for s in expected.steps]
