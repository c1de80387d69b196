"""Head-sparse decoding: all heads open = plain generation; none open = a reference streaming attention."""
import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import make_tiny_lm
from old_tracer import index_gather
from dynheads.errors import ModelError
from dynheads.tracing.sparse import Sparsity, sparse_attention
from dynheads.tracing.tracer import TraceConfig, Tracer

PROMPT_LEN, NEW = 60, 10
SINK, RECENT = 4, 8


def _ids(seed=1):
    return torch.randint(3, 97, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sparse_tokens(lm, policy, sparsity, full_pass_first=False):
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
    state = tracer.prefill(_ids())
    return tracer.generate(state, heads=policy, sparsity=sparsity, full_pass_first=full_pass_first)


def _streaming_reference(model, ids, sink, recent):
    """Greedy decoding where each new query sees only the first `sink` and last `recent` keys (2D mask, stock HF)."""
    cache, out_ids, logps = DynamicCache(config=model.config), [], []
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:-1]]), cache=cache, use_cache=True)
        token = ids[-1]
        for _ in range(NEW):
            n = cache.get_seq_length() + 1
            mask = torch.zeros(1, n, dtype=torch.long)
            mask[0, :sink], mask[0, n - recent:] = 1, 1
            logits = model(input_ids=torch.tensor([[token]]), cache=cache, attention_mask=mask,
                           position_ids=torch.tensor([[n - 1]]), use_cache=True).logits[0, -1]
            logp = torch.log_softmax(logits.float(), -1)
            token = int(logp.argmax())
            out_ids.append(token), logps.append(float(logp[token]))
    return out_ids, logps


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_no_head_open_equals_reference_streaming_attention(impl):
    lm = make_tiny_lm("llama")
    lm.model.set_attn_implementation(impl)
    closed = lambda t, prev, full: np.zeros((2, 2), bool)  # noqa: E731
    trace = _sparse_tokens(lm, closed, Sparsity(SINK, RECENT))
    ref_ids, ref_logp = _streaming_reference(lm.model, _ids(), SINK, RECENT)
    assert trace.token_ids == ref_ids
    np.testing.assert_allclose([s.logprob for s in trace.steps], ref_logp, atol=1e-5)
    plain = Tracer(lm, TraceConfig(max_new_tokens=NEW)).generate(Tracer(lm).prefill(_ids()))
    assert trace.token_ids != plain.token_ids  # the restriction changes this model's output
    assert len(trace.open_heads) == NEW and not np.any(trace.open_heads)


@pytest.mark.parametrize("unit", ["kv", "query"])
def test_every_head_open_equals_plain_generation(unit):
    lm = make_tiny_lm("mistral")
    plain = Tracer(lm, TraceConfig(max_new_tokens=NEW))
    expected = plain.generate(plain.prefill(_ids()))
    shape = (2, 2 if unit == "kv" else 4)
    trace = _sparse_tokens(lm, lambda t, prev, full: np.ones(shape, bool), Sparsity(SINK, RECENT, unit))
    assert trace.token_ids == expected.token_ids
    assert [s.logprob for s in trace.steps] == [s.logprob for s in expected.steps]
    assert trace.steps[0].arrays == {}  # no per-head rows during sparse steps


def test_prompt_shorter_than_sinks_plus_window_changes_nothing():
    lm = make_tiny_lm("llama")
    plain = Tracer(lm, TraceConfig(max_new_tokens=NEW))
    expected = plain.generate(plain.prefill(_ids()))
    trace = _sparse_tokens(lm, lambda t, prev, full: np.zeros((2, 2), bool), Sparsity(10, PROMPT_LEN + NEW))
    assert trace.token_ids == expected.token_ids


def test_policy_sees_previous_step_and_full_pass():
    lm = make_tiny_lm("llama")
    seen = []

    def policy(t, prev, full):
        seen.append((t, None if prev is None else prev.step, full.arrays["top1_pos"].shape))
        return np.zeros((2, 2), bool)

    trace = _sparse_tokens(lm, policy, Sparsity(SINK, RECENT), full_pass_first=True)
    assert seen[:3] == [(0, None, (2, 4)), (1, 0, (2, 4)), (2, 1, (2, 4))]
    ref_ids, _ = _streaming_reference(lm.model, _ids(), SINK, RECENT)
    assert trace.token_ids == ref_ids  # the full pass is cropped away before the sparse step


def test_sparse_decoding_refuses_recorded_rows(tiny_lm):
    tracer = Tracer(tiny_lm, TraceConfig(max_new_tokens=2))
    with pytest.raises(ModelError, match="record_rows=False"):
        tracer.generate(tracer.prefill(_ids()), heads=lambda t, p, f: np.zeros((2, 2), bool))


class _Module:
    num_key_value_groups, is_causal, training = 2, True, False


def _manual(q, k, v, scale):
    return torch.softmax(q @ k.T * scale, -1) @ v


def test_query_unit_restricts_single_query_heads_and_kv_unit_whole_groups():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    keep = list(range(3)) + list(range(30, 40))
    scale = 8 ** -0.5

    def run(open_units, unit):
        out, _ = sparse_attention(sdpa_attention_forward, _Module(), q, k, v, None, torch.tensor(open_units),
                                  Sparsity(3, 10, unit), scale, 0.0, {})
        return out[0, 0]

    query_out = run([False, True, False, False], "query")  # head 1 open; heads 0, 2, 3 streaming
    for h in range(4):
        kv = h // 2
        cols = slice(None) if h == 1 else keep
        torch.testing.assert_close(query_out[h], _manual(q[0, h], k[0, kv, cols], v[0, kv, cols], scale)[0])
    torch.testing.assert_close(run([True, True, False, False], "query"), run([True, False], "kv"))
    assert sparse_attention(sdpa_attention_forward, _Module(), q, k, v, None, torch.tensor([True, True]),
                            Sparsity(3, 10), scale, 0.0, {}) is None  # all open: the caller's stock call


def test_kv_read_fraction_counts_sinks_and_window_of_closed_heads():
    s = Sparsity(4, 16, "kv")
    assert s.kv_read(np.array([[True, False], [False, False]]), 100, 2) == pytest.approx((100 + 3 * 20) / 400)
    q = Sparsity(4, 16, "query")  # one open query head makes its whole KV head read
    assert q.kv_read(np.array([[True, False, False, False], [False, False, False, False]]), 100, 2) == \
        pytest.approx((100 + 3 * 20) / 400)
    assert s.kv_read(np.zeros((2, 2), bool), 10, 2) == 1.0  # short context: everything is read anyway


def test_the_stop_step_is_counted_among_the_steps_that_ran():
    """An answer that ends at step 0 still ran (and read the cache for) one sparse step: it is in open_heads."""
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
    state = tracer.prefill(_ids())
    first = tracer.generate(state, heads=lambda t, prev, full: np.ones((2, 2), bool), sparsity=Sparsity(SINK, RECENT))
    tracer.stop_ids = {first.token_ids[0]}  # the first token now ends the answer
    trace = tracer.generate(state, heads=lambda t, prev, full: np.ones((2, 2), bool), sparsity=Sparsity(SINK, RECENT))
    assert trace.token_ids == [] and trace.stop_id == first.token_ids[0]
    assert len(trace.open_heads) == 1 and trace.open_heads[0].all()


# --- the gather: views for open heads, S + W copies for closed ones, same bits as a plain index gather ---
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "mistral"])
def test_gather_gives_the_bits_of_an_index_gather(family, monkeypatch):
    import dynheads.tracing.attention as attention_module
    from dynheads.conformance import build_tiny
    from dynheads.heads import HeadLayout
    from dynheads.models import LoadedModel

    model = build_tiny(family)
    lm = LoadedModel(model, None, HeadLayout.from_config(model.config), family, "", family)
    layers, kv, heads = lm.layout.n_layers, lm.layout.n_kv_heads, lm.layout.n_heads

    def run():
        tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
        tracer.stop_ids = set()
        out = []
        for unit, width in (("kv", kv), ("query", heads)):
            for p in (0.0, 0.3, 0.6):
                rng = np.random.default_rng(int(p * 10))
                trace = tracer.generate(tracer.prefill(_ids()), heads=lambda t, prev, full: rng.random((layers, width)) < p,
                                        sparsity=Sparsity(SINK, RECENT, unit))
                out.append(trace.arrays())
        return out

    fast = run()
    monkeypatch.setattr(attention_module, "sparse_attention", index_gather)
    for a, b in zip(run(), fast):
        assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_open_heads_read_the_cache_through_a_view_and_closed_heads_copy_only_sinks_and_window():
    cache_k, cache_v = torch.randn(1, 3, 100, 8), torch.randn(1, 3, 100, 8)
    key, value = cache_k[:, :, :60], cache_v[:, :, :60]  # the in-place cache's views
    calls = []

    def stock(module, q, k, v, mask, **kw):
        calls.append((q.shape[1], k.shape[-2], k.untyped_storage().data_ptr() == cache_k.untyped_storage().data_ptr()))
        return torch.zeros(1, 1, q.shape[1], 8), None

    q = torch.randn(1, 6, 1, 8)
    module = type("M", (), {"num_key_value_groups": 2})()
    sparse_attention(stock, module, q, key, value, None, torch.tensor([True, True, False]), Sparsity(4, 8), 1.0, 0.0, {})
    assert calls == [(4, 60, True), (2, 12, False)]  # 2 open KV heads: a view; 1 closed: its 12 keys copied
