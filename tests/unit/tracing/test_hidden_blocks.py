"""Decode steps skip the leading key blocks their mask hides from every head (sliding windows, hidden
context): the stock SDPA call, the recorded row and the open heads of head-sparse decoding then read
only the rest, with bit-identical tokens and records (checked against the same trace with skipping
off) on every sliding-window family, on hidden keys, and on Gemma 3 270M past its 512-token window."""
import numpy as np
import pytest
import torch

import dynheads.tracing.attention as attention_module
from dynheads.conformance import FAMILIES, build_tiny
from dynheads.errors import ModelError
from dynheads.heads import HeadLayout
from dynheads.models import LoadedModel
from dynheads.tracing.sparse import Sparsity
from dynheads.tracing.tracer import TraceConfig, Tracer

SLIDING = sorted(f for f, kw in FAMILIES.items() if "sliding_window" in kw)
PROMPT = 1300  # past two 512-key blocks: a 16-key window hides the first block (one whole block is kept)


def _skipped_and_reference(lm, work, monkeypatch):
    """work() with block skipping, then without it (KEY_BLOCK too large to ever apply); the calls skipped."""
    skips = []
    original = attention_module._hidden_blocks

    def counting(*args):
        skips.append(original(*args))
        return skips[-1]

    with monkeypatch.context() as m:
        m.setattr(attention_module, "_hidden_blocks", counting)
        fast = work()
    with monkeypatch.context() as m:
        m.setattr(attention_module, "KEY_BLOCK", 10**9)
        reference = work()
    return fast, reference, skips


def _assert_same(a: dict, b: dict):
    for cond in a:
        assert sorted(a[cond]) == sorted(b[cond])
        for name in a[cond]:
            assert a[cond][name].tobytes() == b[cond][name].tobytes(), f"{cond}/{name}"


def _work(lm, ids, hidden=None):
    tracer = Tracer(lm, TraceConfig(max_new_tokens=6, topk=3))
    tracer.stop_ids = set()
    state = tracer.prefill(ids, {"needle": [(600, 610)]}, hidden_keys=hidden)
    mask = np.zeros(lm.layout.shape, bool)
    mask[:, 0] = True
    sparse = Tracer(lm, TraceConfig(max_new_tokens=6, record_rows=False))
    sparse.stop_ids = set()
    half = np.arange(lm.layout.n_layers * lm.layout.n_kv_heads).reshape(lm.layout.n_layers, -1) % 2 == 0
    out = {"trace": tracer.generate(state).arrays(),
           "ablation": tracer.generate(state, intervention=lambda v: mask).arrays()}
    try:
        out["sparse"] = sparse.generate(sparse.prefill(ids, hidden_keys=hidden), heads=lambda t, p, f: half,
                                        sparsity=Sparsity(4, 8)).arrays()
    except ModelError as exc:  # gpt_oss: its sinks cannot be split per head
        out["sparse"] = {"refused": np.array(str(exc))}
    return out


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_families_record_the_same_when_hidden_blocks_are_skipped(family, monkeypatch):
    model = build_tiny(family, max_position_embeddings=2048)
    lm = LoadedModel(model, None, HeadLayout.from_config(model.config), family, "", family)
    ids = torch.randint(3, 97, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    fast, reference, skips = _skipped_and_reference(lm, lambda: _work(lm, ids), monkeypatch)
    _assert_same(fast, reference)
    if model.config._attn_implementation == "sdpa":
        assert 512 in skips  # the sliding layers' decode calls really skipped a block (one whole block stays)


def test_hidden_context_is_skipped_in_full_attention_layers(monkeypatch):
    model = build_tiny("llama", max_position_embeddings=2048)
    lm = LoadedModel(model, None, HeadLayout.from_config(model.config), "llama", "", "llama")
    ids = torch.randint(3, 97, (PROMPT,), generator=torch.Generator().manual_seed(6)).tolist()
    hidden = np.zeros(PROMPT, bool)
    hidden[:1100] = True
    fast, reference, skips = _skipped_and_reference(lm, lambda: _work(lm, ids, hidden), monkeypatch)
    _assert_same(fast, reference)
    assert 512 in skips and np.all(fast["trace"]["top1_pos"] >= 1100)


def test_gemma_records_the_same_past_its_window_when_hidden_blocks_are_skipped(gemma_lm, monkeypatch):
    from dynheads.tasks.niah import NiahConfig, niah_samples

    enc = next(niah_samples(gemma_lm.tokenizer, NiahConfig(lengths=(1100,), depths=(10,), samples_per_cell=1)))
    fast, reference, skips = _skipped_and_reference(gemma_lm, lambda: _work(gemma_lm, enc.input_ids), monkeypatch)
    _assert_same(fast, reference)
    assert 512 in skips  # the window of 512 keys starts past the first block
