"""The tracer against plain generation (SDPA) and an eager output_attentions reference."""
import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from dynheads.tracing.tracer import TraceConfig, Tracer

ARCHS = ["llama", "qwen2", "mistral", "phi3"]
PROMPT_LEN, NEW = 40, 12
SPAN = (10, 18)


def _prompt(seed=1):
    return torch.randint(3, 97, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def _eager_reference(model, ids, generated):
    """Attention rows of the query that produced each generated token, from eager output_attentions."""
    model.set_attn_implementation("eager")
    try:
        full = torch.cat([ids, torch.tensor([generated])], 1)
        with torch.no_grad():
            out = model(full, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    rows = torch.stack([a[0, :, PROMPT_LEN - 1: PROMPT_LEN - 1 + len(generated)] for a in out.attentions])
    hidden = out.hidden_states[-1][0, PROMPT_LEN - 1: PROMPT_LEN - 1 + len(generated)]
    return rows.permute(2, 0, 1, 3), hidden  # [T, L, H, S], [T, d]


@pytest.mark.parametrize("arch", ARCHS)
def test_tracer_matches_generate_and_eager_reference(arch):
    lm = make_tiny_lm(arch)
    ids = _prompt()
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, topk=3))
    state = tracer.prefill(ids[0].tolist(), {"needle": [SPAN]})
    trace = tracer.generate(state)
    plain = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                              eos_token_id=None, pad_token_id=0)
    assert trace.token_ids == plain[0, PROMPT_LEN:].tolist()

    rows, hidden = _eager_reference(lm.model, ids, trace.token_ids)
    arrays = trace.arrays()
    assert arrays["top1_pos"].shape == (NEW, 2, 4)
    np.testing.assert_array_equal(arrays["top1_pos"], rows.argmax(-1).numpy())
    np.testing.assert_array_equal(arrays["topk_pos"][..., 0], arrays["top1_pos"])
    torch.testing.assert_close(torch.from_numpy(arrays["mass_needle"]), rows[..., SPAN[0]:SPAN[1]].sum(-1),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(arrays["hidden"]), hidden, atol=1e-4, rtol=1e-4)
    seq = np.concatenate([ids[0].numpy(), np.array(trace.token_ids)])
    np.testing.assert_array_equal(arrays["top1_token"], seq[arrays["top1_pos"]])


def test_context_mass_leaves_out_sinks_and_local_window():
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=3, sink_tokens=4, local_window=8))
    ids = _prompt()
    trace = tracer.generate(tracer.prefill(ids[0].tolist(), {"needle": [SPAN]}))
    rows, _ = _eager_reference(lm.model, ids, trace.token_ids)
    for t in range(3):
        n_keys = PROMPT_LEN + t
        expected = rows[t, ..., 4: n_keys - 8].sum(-1)
        torch.testing.assert_close(torch.from_numpy(trace.arrays()["context_mass"][t]), expected,
                                   atol=1e-5, rtol=1e-4)


def test_fork_restores_the_prefill_and_repeats_exactly(tiny_lm):
    tracer = Tracer(tiny_lm, TraceConfig(max_new_tokens=8))
    state = tracer.prefill(_prompt()[0].tolist(), {"needle": [SPAN]})
    n_cache, n_ids = state.cache.get_seq_length(), len(state.ids)
    first = tracer.generate(state).arrays()
    assert state.cache.get_seq_length() == n_cache and len(state.ids) == n_ids
    second = tracer.generate(state).arrays()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_stops_on_end_of_turn_token(tiny_lm):
    tracer = Tracer(tiny_lm, TraceConfig(max_new_tokens=8))
    state = tracer.prefill(_prompt()[0].tolist())
    free = tracer.generate(state)
    tracer.stop_ids = {free.token_ids[3]}
    stopped = tracer.generate(state)
    assert stopped.stop_id == free.token_ids[3]
    first_stop = free.token_ids.index(free.token_ids[3])
    assert stopped.token_ids == free.token_ids[:first_stop]


def test_hidden_keys_receive_no_attention(tiny_lm):
    tracer = Tracer(tiny_lm, TraceConfig(max_new_tokens=4))
    ids = _prompt()[0].tolist()
    hidden = np.zeros(len(ids), bool)
    hidden[SPAN[0]:SPAN[1]] = True
    state = tracer.prefill(ids[:SPAN[1]], {"needle": [SPAN]})  # the hidden part itself is prefilled normally
    state.hidden_keys = hidden
    tracer.extend(state, ids[SPAN[1]:], hidden_keys=hidden)
    arrays = tracer.generate(state).arrays()
    assert np.all(arrays["mass_needle"] == 0.0)
    assert not np.any((arrays["top1_pos"] >= SPAN[0]) & (arrays["top1_pos"] < SPAN[1]))


def test_trace_generation_one_call_api(tiny_lm):
    from dynheads import trace_generation

    ids = _prompt()[0].tolist()
    trace, arrays = trace_generation(tiny_lm.model, tiny_lm.tokenizer, ids, needle_span=SPAN,
                                     config=TraceConfig(max_new_tokens=6))
    assert len(trace.token_ids) == 6 and arrays["score"].shape == (6, 2, 4)
    expected = ((arrays["top1_pos"] >= SPAN[0]) & (arrays["top1_pos"] < SPAN[1])
                & (arrays["top1_token"] == arrays["token_id"][:, None, None]))
    np.testing.assert_array_equal(arrays["score"], expected.astype(np.float32))


def test_intervention_run_that_stops_at_once_has_empty_records(tiny_lm):
    tracer = Tracer(tiny_lm, TraceConfig(max_new_tokens=4))
    state = tracer.prefill(_prompt()[0].tolist())
    tracer.stop_ids = {tracer.generate(state).token_ids[0]}
    trace = tracer.generate(state, intervention=lambda view: np.ones((2, 4), bool))
    arrays = trace.arrays()
    assert trace.token_ids == [] and arrays["ablated"].shape == (0, 2, 4) and len(arrays["token_id"]) == 0
