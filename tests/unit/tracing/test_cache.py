"""Today's tracer against the tracer before the in-place cache (old_tracer.py: DynamicCache with torch.cat per
update, one-call prefills, decode steps that read every key, the index gather of head-sparse steps). Every
record array, token, sample file and run config must be byte-identical on every conformance family and on
whole NIAH run folders of both named models (Gemma 3 past its sliding window). Today's prefills are chunked
at 512 tokens here so that short prompts exercise the chunking too; decode steps past 1,024 keys skip the
key blocks their mask hides. Plus the in-place layer's own behaviour."""
import json

import numpy as np
import pytest
import torch

from dynheads.conformance import FAMILIES, build_tiny
from dynheads.errors import ModelError
from dynheads.heads import HeadLayout
from dynheads.models import LoadedModel
from dynheads.tracing.cache import InPlaceLayer, croppable_cache, prefill_chunks
from dynheads.tracing.sparse import Sparsity
from dynheads.tracing.tracer import TraceConfig, Tracer
from old_tracer import assert_same_arrays, old_and_new

EXACT = sorted(set(FAMILIES) - {"bloom", "mpt"})  # the conformance table's traceable families
NEW = 4
PROMPT = {"sdpa": 1100, "eager": 300}  # sdpa: past two 512-key blocks (chunked prefills, skipped blocks)


def _prompt(lm, seed):
    n = PROMPT[lm.model.config._attn_implementation]
    return torch.randint(3, lm.model.config.get_text_config().vocab_size, (n,),
                         generator=torch.Generator().manual_seed(seed)).tolist()


def _workload(lm, ids) -> dict[str, dict]:
    """Traces, forks, a generation past the reserve, ablations, an extend over hidden keys, a rewind,
    and head-sparse decoding by KV head and by query head."""
    needle = (len(ids) // 2, len(ids) // 2 + 10)
    hidden_end = len(ids) * 7 // 11  # in-context RAG: keys [0, 700) of 1,100 hidden from the question
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, topk=3, row_spans=("needle",)))
    tracer.stop_ids = set()
    state = tracer.prefill(ids, {"needle": [needle]})
    out = {"trace": tracer.generate(state).arrays(), "fork": tracer.generate(state).arrays()}
    out["longer"] = tracer.generate(state, max_new_tokens=NEW + 4).arrays()  # grows past the prefill's reserve
    mask = np.zeros(lm.layout.shape, bool)
    mask[-1, ::2] = mask[0, 1] = True
    for method in ("zero", "uniform"):
        out[method] = tracer.generate(state, intervention=lambda v: mask, ablation=method).arrays()
    partial = tracer.prefill(ids[:hidden_end], {"needle": [needle]})
    hidden = np.zeros(len(ids), bool)
    hidden[:hidden_end] = True
    tracer.extend(partial, ids[hidden_end:], hidden_keys=hidden)
    partial.hidden_keys = hidden
    out["extended"] = tracer.generate(partial, fork=False).arrays()
    tracer.rewind(partial, len(ids) - 3)  # back into the prompt, then on again
    out["rewound"] = tracer.generate(partial).arrays()
    sparse = Tracer(lm, TraceConfig(max_new_tokens=NEW, record_rows=False))
    sparse.stop_ids = set()
    layers, kv, heads = lm.layout.n_layers, lm.layout.n_kv_heads, lm.layout.n_heads
    for unit, width in (("kv", kv), ("query", heads)):
        policy = lambda t, prev, full, w=width: np.arange(layers * w).reshape(layers, w) % 3 == t % 3  # noqa: E731
        try:
            trace = sparse.generate(sparse.prefill(ids), heads=policy, sparsity=Sparsity(4, 8, unit), full_pass_first=unit == "kv")
            out[f"sparse_{unit}"] = {**trace.arrays(), "open": np.stack(trace.open_heads)}
        except ModelError as exc:  # a per-head term (gpt_oss sinks) is refused mid-step, the same way with either
            out[f"sparse_{unit}"] = {"refused": np.array(str(exc))}
    return out


def _tiny(family, **kw):
    model = build_tiny(family, max_position_embeddings=2048, **kw)
    return LoadedModel(model, None, HeadLayout.from_config(model.config), family, "", family)


@pytest.mark.parametrize("family", EXACT)
def test_every_family_records_what_the_old_tracer_recorded(family, monkeypatch):
    lm = _tiny(family)
    ids = _prompt(lm, 1)
    old, new, skips, calls = old_and_new(monkeypatch, lambda: _workload(lm, ids))
    assert sorted(old) == sorted(new)
    for condition in old:
        assert_same_arrays(old[condition], new[condition], f"{family}/{condition}")
    if lm.model.config._attn_implementation == "sdpa":
        assert calls[:3] == [512, 512, len(ids) - 1 - 1024]  # the prefill really was chunked
        assert (1, 512) in skips  # hidden keys (and sliding windows) hid a whole block from decode steps
        if "sliding_window" in FAMILIES[family]:
            assert (75, 512) in skips  # and from the last prefill chunk's sliding layers


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_eager_stock_records_the_same(family, monkeypatch):
    """Forced eager (the default families of the table run sdpa): repeat_kv and the eager matmuls on the views."""
    lm = _tiny(family, attn_implementation="eager")
    ids = _prompt(lm, 2)
    old, new, _, _ = old_and_new(monkeypatch, lambda: _workload(lm, ids))
    for condition in old:
        assert_same_arrays(old[condition], new[condition], f"{family}-eager/{condition}")


# --- whole run folders on the named models ---------------------------------------------------
def _niah_folders(lm, tmp_path, monkeypatch, **niah):
    from dynheads.commands import run_niah

    folders = iter([tmp_path / "old", tmp_path / "new"])
    return old_and_new(monkeypatch, lambda: run_niah(lm, next(folders), samples_per_cell=1, topk=3, quiet=True,
                                                      **niah).path)


def assert_same_run_folders(old, new) -> None:
    from dynheads.records import load_sample_records

    names = sorted(p.name for p in (old / "samples").glob("*.json"))
    assert names and names == sorted(p.name for p in (new / "samples").glob("*.json"))
    configs = [json.loads((run / "config.json").read_text()) for run in (old, new)]
    assert configs[0] | {"created": None} == configs[1] | {"created": None}  # the same run but for its time
    for name in names:
        assert (old / "samples" / name).read_bytes() == (new / "samples" / name).read_bytes(), name
        stem = name.removesuffix(".json")
        assert_same_arrays(load_sample_records(old / "records" / f"{stem}.npz"),
                           load_sample_records(new / "records" / f"{stem}.npz"), stem)


def test_default_model_niah_run_folders_are_identical(default_lm, tmp_path, monkeypatch):
    old, new, _, calls = _niah_folders(default_lm, tmp_path, monkeypatch, lengths=(600,), depths=(50,),
                                       max_new_tokens=16)
    assert 512 in calls  # chunked
    assert_same_run_folders(old, new)


def test_gemma_niah_run_folders_are_identical_past_the_sliding_window(gemma_lm, tmp_path, monkeypatch):
    old, new, skips, calls = _niah_folders(gemma_lm, tmp_path, monkeypatch, lengths=(1100,), depths=(10,),
                                           max_new_tokens=8)
    assert calls[:2] == [512, 512]  # chunked; the 512-key window hid the first block from the last chunk and the steps
    assert (1, 512) in skips and any(rows > 1 and skipped == 512 for rows, skipped in skips)
    assert_same_run_folders(old, new)


def test_default_model_sparse_tokens_are_identical(default_lm, monkeypatch):
    """Head-sparse decoding on the real model: k = 8 of 90 KV heads open (scattered: an index gather in three
    layers, a view elsewhere), the rest gather sinks + window."""
    from dynheads.tasks.niah import NiahConfig, niah_samples

    enc = next(niah_samples(default_lm.tokenizer, NiahConfig(lengths=(400,), depths=(50,), samples_per_cell=1)))
    tracer = Tracer(default_lm, TraceConfig(max_new_tokens=8, record_rows=False))
    opened = np.zeros(default_lm.layout.shape[:1] + (default_lm.layout.n_kv_heads,), bool)
    opened[[0, 0, 1, 1, 5, 9, 17, 29], [0, 1, 0, 2, 1, 2, 0, 2]] = True

    def sparse():
        trace = tracer.generate(tracer.prefill(enc.input_ids), heads=lambda t, p, f: opened, sparsity=Sparsity())
        return trace.arrays()

    old, new, _, _ = old_and_new(monkeypatch, sparse)
    assert_same_arrays(old, new, "sparse")


# --- the layer itself ---------------------------------------------------------------------------
def test_layer_writes_in_place_crops_by_length_and_grows():
    layer = InPlaceLayer(reserve=6)
    k, v = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3)
    keys, values = layer.update(k, v)
    buffer = layer._key_buffer
    assert layer.capacity == 6 and torch.equal(keys, k) and torch.equal(values, v) and keys.data_ptr() == buffer.data_ptr()
    step = torch.randn(1, 2, 1, 3)
    keys, _ = layer.update(step, step)
    assert keys.shape[-2] == 5 and layer._key_buffer is buffer  # no copy of the filled part
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and layer.get_mask_sizes(1) == (4, 0) and layer._key_buffer is buffer
    keys, _ = layer.update(step, step)
    assert torch.equal(keys, torch.cat([k[..., :3, :], step], -2))
    keys, _ = layer.update(torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3))  # past the buffer: grows
    assert keys.shape[-2] == 9 and layer.capacity >= 9 and torch.equal(keys[..., :3, :], k[..., :3, :])
    layer.reorder_cache(torch.tensor([0]))  # a DynamicLayer method that replaces the tensors: adopted again
    keys, _ = layer.update(step, step)
    assert keys.shape[-2] == 10 and torch.equal(keys[..., :3, :], k[..., :3, :])


def test_sliding_layers_keep_every_key_and_masks_see_the_filled_length():
    model = build_tiny("gemma3_text")
    cache = croppable_cache(model.config, reserve=64)
    assert all(type(layer) is InPlaceLayer for layer in cache.layers) and cache.is_croppable
    with torch.no_grad():
        model(input_ids=torch.arange(3, 43)[None], cache=cache, use_cache=True)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [40, 40]  # window 16: nothing dropped
    assert [cache.get_mask_sizes(1, i) for i in range(2)] == [(41, 0), (41, 0)]
    assert all(layer.capacity == 64 for layer in cache.layers)


def test_chunks_end_on_multiples_of_the_chunk():  # (512-token chunks are tested above, against one call)
    assert prefill_chunks(0, 8192) == [(0, 8192)]  # up to 8K: one call, as plain generation makes it
    assert prefill_chunks(0, 9000) == [(0, 2048), (2048, 4096), (4096, 6144), (6144, 8192), (8192, 9000)]
    assert prefill_chunks(5000, 20000, 8192, 8192) == [(5000, 8192), (8192, 16384), (16384, 20000)]
    assert prefill_chunks(0, 3000, windowed=True) == [(0, 2048), (2048, 3000)]  # sliding layers: chunks from 2K
