"""Head ablation inside the traced attention: masking nothing is exact, masking a head touches only it."""
import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from dynheads.tracing.tracer import TraceConfig, Tracer

PROMPT_LEN, NEW, SPAN = 40, 10, (10, 18)


def _ids(seed=1):
    return torch.randint(3, 97, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["zero", "uniform"])
def test_masking_no_heads_reproduces_the_unmasked_run_exactly(arch, method):
    lm = make_tiny_lm(arch)
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, row_spans=("needle",)))
    state = tracer.prefill(_ids(), {"needle": [SPAN]})
    plain = tracer.generate(state).arrays()
    none = np.zeros(lm.layout.shape, bool)
    for intervention in (lambda view: none, lambda view: None):
        masked = tracer.generate(state, intervention=intervention, ablation=method).arrays()
        assert not masked["ablated"].any() and masked["ablated"].shape == (NEW,) + lm.layout.shape
        np.testing.assert_array_equal(masked["clean_token_id"], plain["token_id"])
        np.testing.assert_array_equal(masked["masked_top1_pos"], plain["top1_pos"])
        np.testing.assert_array_equal(masked["masked_top1_token"], plain["top1_token"])
        for name, value in plain.items():
            np.testing.assert_array_equal(masked[name], value, err_msg=name)


def _o_proj_inputs(model):
    """Forward pre-hooks capturing each layer's output-projection input of the newest row, per call."""
    captured = {i: [] for i in range(len(model.model.layers))}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args, i=i: captured[i].append(args[0][0, -1].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    return captured, handles


@pytest.mark.parametrize("method", ["zero", "uniform"])
@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_masking_one_head_changes_only_that_heads_output(method, layer, head):
    lm = make_tiny_lm("llama")  # 2 layers, 4 query heads reading 2 KV heads
    d = lm.model.config.hidden_size // lm.layout.n_heads
    tracer = Tracer(lm, TraceConfig(max_new_tokens=1))
    state = tracer.prefill(_ids(), {"needle": [SPAN]})
    mask = np.zeros(lm.layout.shape, bool)
    mask[layer, head] = True
    captured, handles = _o_proj_inputs(lm.model)
    try:
        trace = tracer.generate(state, intervention=lambda view: mask, ablation=method, fork=False)
    finally:
        for h in handles:
            h.remove()
    assert trace.masks[0][layer, head]
    for l in range(layer):  # layers before the masked one see identical inputs
        torch.testing.assert_close(captured[l][1], captured[l][0], atol=0, rtol=0)
    clean, masked = captured[layer][0].view(lm.layout.n_heads, d), captured[layer][1].view(lm.layout.n_heads, d)
    others = [h for h in range(lm.layout.n_heads) if h != head]
    torch.testing.assert_close(masked[others], clean[others], atol=0, rtol=0)
    values = state.cache.layers[layer].values[0, lm.layout.kv_head(head)]  # [S, D]: every key the row sees
    assert values.shape[0] == PROMPT_LEN
    if method == "zero":
        expected = torch.zeros(d)
        assert torch.equal(masked[head], expected)
    else:  # uniform attention over the visible keys: the mean of its KV head's values
        expected = values.float().mean(0)
        torch.testing.assert_close(masked[head], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(clean[head], expected)  # the ablation really changed the head
