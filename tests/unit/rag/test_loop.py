"""The Dynamic RAG loop on a tiny random model: masking is exact, degenerate strategies equal plain
generation, and injected parts drive exactly the retrievals they ask for."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from dynheads.analyses.probes import Probe, ProbeConfig
from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.headsets.base import AFTER_FULL_PASS, HeadSet, build, top_k
from dynheads.headsets.names import RAG
from dynheads.rag import loop
from dynheads.rag.modes import ContextWindows
from dynheads.rag.trigger import NeverTrigger, RindTrigger, TriggerDecision
from dynheads.runners.rag import fit_regressor
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample
from dynheads.tracing.tracer import TraceConfig, Tracer

N_IDS, CONTEXT, SUPPORT = 60, (5, 40), (15, 20)
CFG = loop.RagConfig(max_new_tokens=20, max_sentence_tokens=7)


def strategy(name: str, n_heads: int = 5, **inputs) -> HeadSet:
    """A `rag --heads` strategy as the runner builds it: its head set choosing n_heads query heads."""
    return build(RAG.get(name), k=n_heads, **inputs)


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm("llama")


@pytest.fixture(scope="module")
def enc():
    ids = torch.randint(3, 97, (N_IDS,), generator=torch.Generator().manual_seed(1)).tolist()
    sample = Sample("q1", "c", "q", "a", {"support": [(0, 1)]}, PromptFormat(None, "{context}"))
    return EncodedSample(sample, ids, {"support": [SUPPORT]}, CONTEXT, "")


def _hidden():
    mask = np.zeros(N_IDS, bool)
    mask[CONTEXT[0]:CONTEXT[1]] = True
    return mask


class FirstDraftOnly:
    """Fires on the first draft only, at token 2."""

    def __init__(self):
        self.calls = 0

    def should_retrieve(self, entropy, attention, tokens):
        self.calls += 1
        assert len(entropy) == len(tokens) and attention.shape == (4, len(tokens), len(tokens))  # every head
        return TriggerDecision(self.calls == 1, 2 if self.calls == 1 else None)


class FixedWindows:
    """Opens context tokens [10, 18) (relative), whatever the heads attend to; remembers what it saw."""

    def __init__(self):
        self.seen = []

    def retrieve(self, attention, sentences=None):
        self.seen.append(np.asarray(attention))
        return [(10, 18)]


def test_full_equals_plain_traced_generation(lm, enc):
    tracer = Tracer(lm, TraceConfig(mass_spans=("context",)))
    result = loop.run(tracer, enc, RindTrigger(threshold=0.0), ContextWindows(), strategy("full"), CFG)
    plain = tracer.generate(tracer.prefill(enc.input_ids, {"context": [CONTEXT]}), max_new_tokens=20)
    assert result.token_ids == plain.token_ids and len(result.token_ids) == 20
    assert result.retrievals == [] and result.stopped == "budget" and result.n_drafts == 3
    np.testing.assert_allclose(result.arrays["mass_context"], plain.arrays()["mass_context"], rtol=1e-5, atol=1e-6)
    assert result.support_coverage == 1.0 and result.opened_fraction == 1.0


def test_none_equals_generation_with_the_whole_context_hidden(lm, enc):
    tracer = Tracer(lm)
    result = loop.run(tracer, enc, RindTrigger(threshold=0.0), ContextWindows(), strategy("none"), CFG)
    hidden = tracer.generate(tracer.prefill(enc.input_ids, hidden_keys=_hidden()), max_new_tokens=20)
    assert result.token_ids == hidden.token_ids and result.retrievals == []
    visible = tracer.generate(tracer.prefill(enc.input_ids), max_new_tokens=20)
    assert hidden.token_ids != visible.token_ids  # the mask matters for this prompt
    assert (result.arrays["mass_context"] == 0).all() and result.support_coverage == 0.0


def test_hidden_context_gets_exactly_zero_attention_until_a_window_is_opened(lm, enc):
    views = []

    def pick(step):
        views.append(step.current)
        assert step.t == 0 and step.span == "support" and step.sample is enc and step.budget.k == 5
        return top_k(np.arange(8, dtype=float).reshape(2, 4), 5)

    windows = FixedWindows()
    result = loop.run(Tracer(lm), enc, FirstDraftOnly(), ContextWindows(windows),
                      HeadSet("probe", pick, AFTER_FULL_PASS, build("none", k=5).budget), CFG,
                      np.random.default_rng(0))
    assert len(result.retrievals) == 1 and len(views) == 1
    r = result.retrievals[0]
    assert r.flagged == 2 and r.draft_tokens == 7 and r.windows == [(10, 18)]
    assert r.heads == [3, 4, 5, 6, 7]  # top-5 of the picker's scores, flat layer-major
    # identification step: the whole context visible, rows over it for every head
    rows = views[0].arrays["rows_context"]
    assert rows.shape == (2, 4, CONTEXT[1] - CONTEXT[0]) and (rows > 0).all() and views[0].hidden is not None
    np.testing.assert_array_equal(windows.seen[0], rows[top_k(np.arange(8.0).reshape(2, 4), 5)])
    regen = result.arrays["regenerated"]
    assert regen[:7].all() and not regen[7:].any()  # the whole first draft was retracted and regenerated
    mass, support = result.arrays["mass_context"], result.arrays["mass_support"]
    assert (mass[~regen] == 0).all() and (support[~regen] == 0).all()  # hidden: exactly zero, every head
    assert (mass[regen] > 0).all() and (support[regen] > 0).all()  # support [15, 20) lies in window [15, 23)
    assert result.support_coverage == 1.0 and result.opened_fraction == pytest.approx(8 / 35)


def test_regenerated_sentence_is_generation_under_the_opened_windows(lm, enc):
    ranking = np.arange(8, dtype=float).reshape(2, 4)
    tracer = Tracer(lm)
    result = loop.run(tracer, enc, FirstDraftOnly(), ContextWindows(FixedWindows()),
                      strategy("static", ranking=ranking), CFG, np.random.default_rng(0))
    assert len(result.retrievals) == 1 and result.retrievals[0].heads == [3, 4, 5, 6, 7]
    visible = _hidden()
    visible[CONTEXT[0] + 10: CONTEXT[0] + 18] = False
    state = tracer.prefill(enc.input_ids[: CONTEXT[1] + 1])
    tracer.extend(state, enc.input_ids[CONTEXT[1] + 1:], hidden_keys=_hidden())
    state.hidden_keys = visible
    assert result.token_ids[:7] == tracer.generate(state, max_new_tokens=7).token_ids


def test_retrieval_cap_and_shared_prefill(lm, enc):
    tracer = Tracer(lm)
    prepared = loop.prepare(tracer, enc)
    cfg = loop.RagConfig(max_new_tokens=20, max_sentence_tokens=7, max_retrievals=2)
    first = loop.run(tracer, enc, RindTrigger(threshold=-1.0), ContextWindows(), strategy("dynamic-random", 3), cfg,
                     np.random.default_rng(5), prepared)
    again = loop.run(tracer, enc, RindTrigger(threshold=-1.0), ContextWindows(), strategy("dynamic-random", 3), cfg,
                     np.random.default_rng(5), prepared)
    assert len(first.retrievals) == 2 and all(len(r.heads) == 3 for r in first.retrievals)
    assert first.token_ids == again.token_ids and [r.heads for r in first.retrievals] == [r.heads for r in again.retrievals]
    fixed = strategy("fixed-random", 3)
    res = loop.run(tracer, enc, RindTrigger(threshold=-1.0), ContextWindows(), fixed, cfg, np.random.default_rng(1), prepared)
    assert res.retrievals[0].heads == res.retrievals[1].heads
    assert [r.heads for r in first.retrievals][0] != [r.heads for r in first.retrievals][1]  # redrawn each retrieval
    never = loop.run(tracer, enc, NeverTrigger(), ContextWindows(), strategy("dynamic-random", 3), cfg,
                     np.random.default_rng(5), prepared)
    assert never.retrievals == [] and never.support_coverage == 0.0


def test_dynamic_strategy_uses_the_regressor_and_it_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(300, 6)).astype(np.float32)
    weights = rng.normal(size=(6, 8)).astype(np.float32)
    scores = (hidden @ weights).reshape(300, 2, 4)
    ids = np.repeat([f"s{i}" for i in range(30)], 10)
    config = ProbeConfig(regress=True, hidden_sizes=(64,), lr=1e-2, max_epochs=200, patience=20)
    reg = fit_regressor(hidden, scores, ids, np.random.default_rng(1), {"sample_ids": ["s0"]}, config)
    pred = reg.predict(hidden)
    assert pred.shape == (300, 2, 4) and np.corrcoef(pred.ravel(), scores.ravel())[0, 1] > 0.9
    loaded = Probe.load(reg.save(tmp_path / "r.pt"))
    np.testing.assert_allclose(loaded.predict(hidden[0]), reg.predict(hidden[0]), rtol=1e-6)
    assert loaded.meta["sample_ids"] == ["s0"] and loaded.shape == (2, 4)
    view = loop.StepView(0, 0, 0.0, 0.0, {}, hidden[0])
    chosen = strategy("dynamic", predictor=loaded).at(0, HeadLayout(2, 4, 4), current=view)
    np.testing.assert_array_equal(chosen, top_k(reg.predict(hidden[0]), 5))
    with pytest.raises(ConfigError, match="needs a predictor"):
        strategy("dynamic", predictor=None)
    with pytest.raises(ConfigError, match="needs a ranking"):
        strategy("static", ranking=None)
    with pytest.raises(ConfigError, match="unknown head strategy"):
        strategy("oracle")
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    with pytest.raises(ConfigError, match="not a saved dynheads probe"):
        Probe.load(tmp_path / "bad.pt")
