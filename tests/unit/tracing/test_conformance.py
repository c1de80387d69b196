"""Architecture conformance: every decoder family traces exactly (tokens = generate, rows = eager
output_attentions, fork and ablation working), or is refused in one line before generating."""
import pytest
import torch

from dynheads.conformance import FAMILIES, build_tiny, check_family
from dynheads.errors import ModelError
from dynheads.tracing.attention import StepHooks, _explicit_row, traced_attention

# Attention computed inside their modeling code, not through the interface (transformers 5.25; Falcon
# moved to the interface in 5.25). A family that moves is still checked: see test_refused_means_no_interface.
REFUSED = {"bloom", "mpt"}
EXACT = sorted(set(FAMILIES) - REFUSED)


@pytest.mark.parametrize("family", EXACT)
def test_family_traces_exactly(family):
    result = check_family(family)
    assert result.status == "exact", result
    assert result.tokens_equal and result.top1_mismatches == 0 and result.mass_max_error < 1e-4
    assert result.fork_equal and result.ablation_ok


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_oss", "mistral"])
def test_eager_and_sdpa_stock_both_exact(family):
    """Forcing the other stock implementation (where transformers allows it) is exact as well."""
    other = "sdpa" if build_tiny(family).config._attn_implementation == "eager" else "eager"
    result = check_family(family, attn_implementation=other)
    assert result.status in {"exact", "unbuildable"}, result
    if family in {"llama", "gpt2", "mistral"}:
        assert result.status == "exact" and result.stock == "eager"


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_without_attention_interface_is_refused_in_one_line(family):
    result = check_family(family)
    assert result.status == "refused"
    assert "AttentionInterface" in result.reason and "\n" not in result.reason


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_refused_means_no_interface(family):
    """The REFUSED list is what the installed transformers says: a family is refused exactly when its
    model class cannot switch attention implementation (a newer release may move a family over)."""
    assert (not build_tiny(family)._can_set_attn_implementation()) == (family in REFUSED)


def test_sliding_window_features_are_exercised_past_the_window():
    result = check_family("gemma2")
    assert "sliding window 16" in result.features and "logit soft-cap" in result.features
    assert result.stock == "eager"  # transformers gives Gemma-2 no SDPA path: its eager weights are recorded


# --- the explicit row against the modeling files' own eager definitions --------------------
def _qkv(seed=0, heads=4, kv=2, keys=9, dim=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, 1, dim, generator=g), torch.randn(1, kv, keys, dim, generator=g),
            torch.randn(1, kv, keys, dim, generator=g))


class _Module(torch.nn.Module):
    def __init__(self, groups=2, sinks=None):
        super().__init__()
        self.num_key_value_groups, self.layer_idx, self.training = groups, 0, False
        if sinks is not None:
            self.sinks = torch.nn.Parameter(sinks)


def test_explicit_row_soft_cap_equals_gemma2_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = _qkv()
    _, weights = eager_attention_forward(_Module(), q, k, v, None, scaling=0.3, softcap=2.0)
    torch.testing.assert_close(_explicit_row(q, k, None, 0.3, {"softcap": 2.0}), weights[0, :, -1], atol=1e-6, rtol=0)


def test_explicit_row_sinks_equal_gpt_oss_eager():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _qkv(1)
    sinks = torch.tensor([0.5, 2.0, -1.0, 3.0])
    _, weights = eager_attention_forward(_Module(sinks=sinks), q, k, v, None, scaling=0.3)
    row = _explicit_row(q, k, None, 0.3, {"s_aux": sinks})
    torch.testing.assert_close(row, weights[0, :, -1], atol=1e-6, rtol=0)
    assert bool((row.sum(-1) < 1).all())  # the sink takes mass that is no position's


def test_explicit_row_position_bias_reproduces_the_sdpa_output():
    """Under SDPA a position_bias is added to the scores: the recorded row · V equals SDPA's output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(2)
    bias = torch.randn(1, 4, 1, 9, generator=torch.Generator().manual_seed(3))
    module = _Module()
    out, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3, position_bias=bias)
    row = _explicit_row(q, k, None, 0.3, {"position_bias": bias})
    per_head = torch.einsum("hs,hsd->hd", row, v[0].repeat_interleave(2, dim=0))
    torch.testing.assert_close(per_head, out[0, -1], atol=1e-5, rtol=1e-5)


def test_flash_sliding_window_hides_keys_outside_the_window():
    q, k, _ = _qkv(4)
    row = _explicit_row(q, k, None, 0.3, {"sliding_window": 4})
    assert torch.all(row[:, :5] == 0) and torch.allclose(row.sum(-1), torch.ones(4))


@pytest.mark.parametrize("term", ["s_aux", "softcap", "indices"])
def test_terms_sdpa_cannot_carry_are_refused(term):
    q, k, v = _qkv(5)
    module = _Module()
    module._dynheads_hooks = StepHooks(stock="sdpa")
    value = torch.zeros(4) if term != "softcap" else 30.0
    with pytest.raises(ModelError, match="attn_implementation='eager'"):
        traced_attention(module, q, k, v, None, scaling=0.3, **{term: value})

