"""Under SDPA a long prefill runs in chunks ending at multiples of PREFILL_CHUNK (tracer.extend); its
keys, values and every record are bit-identical to one call. Checked with 512-token chunks (SDPA's CPU
key block) on a tiny model of every traceable family and on both named models; eager families (not
bit-identical in chunks: gpt_oss's sinks) keep one call."""
import numpy as np
import pytest
import torch

import dynheads.tracing.cache as cache_module
from dynheads.conformance import FAMILIES, build_tiny
from dynheads.heads import HeadLayout
from dynheads.models import LoadedModel
from dynheads.tracing.cache import prefill_chunks
from dynheads.tracing.tracer import TraceConfig, Tracer


def test_chunks_end_on_multiples_of_the_chunk():
    assert prefill_chunks(0, 8192, 8192) == [(0, 8192)]  # up to one chunk: one call, as before
    assert prefill_chunks(0, 20000, 8192) == [(0, 8192), (8192, 16384), (16384, 20000)]
    assert prefill_chunks(5000, 20000, 8192) == [(5000, 8192), (8192, 16384), (16384, 20000)]


def _one_call_and_chunked(lm, ids, spans, monkeypatch, chunk=512):
    """(state, record arrays) with the prompt prefilled in one call, then in `chunk`-token chunks."""
    out = []
    for size in (10**9, chunk):
        monkeypatch.setattr(cache_module, "PREFILL_CHUNK", size)
        tracer = Tracer(lm, TraceConfig(max_new_tokens=8, topk=3))
        tracer.stop_ids = set()
        state = tracer.prefill(ids, spans)
        out.append((state, tracer.generate(state).arrays()))
    return out


def _assert_identical(one, chunked):
    (a, ra), (b, rb) = one, chunked
    for x, y in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    assert sorted(ra) == sorted(rb) and all(ra[k].tobytes() == rb[k].tobytes() for k in ra)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"bloom", "mpt"}))
def test_tiny_families_prefill_the_same_in_chunks(family, monkeypatch):
    model = build_tiny(family, max_position_embeddings=2048)
    lm = LoadedModel(model, None, HeadLayout.from_config(model.config), family, "", family)
    ids = torch.randint(3, 97, (1300,), generator=torch.Generator().manual_seed(4)).tolist()
    calls = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    one, chunked = _one_call_and_chunked(lm, ids, {"needle": [(600, 610)]}, monkeypatch)
    chunks = [512, 512, 275] if model.config._attn_implementation == "sdpa" else [1299]
    assert calls[0] == 1299 and calls[9:9 + len(chunks)] == chunks  # one call, then the chunks (8 steps between)
    _assert_identical(one, chunked)


@pytest.mark.parametrize("model_name", ["default_lm", "gemma_lm"])
def test_named_models_prefill_the_same_in_chunks(model_name, request, monkeypatch):
    from dynheads.tasks.niah import NiahConfig, niah_samples

    lm = request.getfixturevalue(model_name)
    enc = next(niah_samples(lm.tokenizer, NiahConfig(lengths=(1100,), depths=(50,), samples_per_cell=1)))
    one, chunked = _one_call_and_chunked(lm, enc.input_ids, enc.token_spans, monkeypatch)
    _assert_identical(one, chunked)
