"""The in-place cache (tracing/cache.py) against the cache it replaced: transformers' DynamicCache with
sliding layers as plain DynamicLayers (torch.cat per update). Every record array, token and sample file
must be byte-identical on every conformance family and on both named models; plus the layer's own
behaviour (writes in place, crops by moving a length, grows, keeps every key of sliding layers)."""
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import dynheads.tracing.tracer as tracer_module
from dynheads.conformance import FAMILIES, build_tiny
from dynheads.errors import ModelError
from dynheads.heads import HeadLayout
from dynheads.models import LoadedModel
from dynheads.tracing.cache import InPlaceLayer, croppable_cache
from dynheads.tracing.sparse import Sparsity
from dynheads.tracing.tracer import TraceConfig, Tracer

EXACT = sorted(set(FAMILIES) - {"bloom", "mpt"})  # the conformance table's traceable families
PROMPT_LEN, NEW, SPAN = 40, 12, (10, 18)


def dynamic_cache(config, reserve: int = 0) -> DynamicCache:
    """The tracer's cache before the in-place one (kept here only as the reference)."""
    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache


def both_caches(monkeypatch, work):
    """`work()` with the reference DynamicCache, then with the in-place cache."""
    built = []
    with monkeypatch.context() as m:
        m.setattr(tracer_module, "croppable_cache", lambda *args, **kw: built.append(1) or dynamic_cache(*args, **kw))
        old = work()
    assert built  # the reference really ran
    return old, work()


def assert_same_arrays(old: dict, new: dict, where: str = "") -> None:
    assert sorted(old) == sorted(new), where
    for name in old:
        a, b = np.asarray(old[name]), np.asarray(new[name])
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}/{name}"
        assert a.tobytes() == b.tobytes(), f"{where}/{name} differs"


def _workload(lm, ids) -> dict[str, dict]:
    """Traces, forks, an extend past the reserve, ablations, hidden keys and head-sparse decoding."""
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW, topk=3, row_spans=("needle",)))
    tracer.stop_ids = set()
    state = tracer.prefill(ids, {"needle": [SPAN]})
    out = {"trace": tracer.generate(state).arrays(), "fork": tracer.generate(state).arrays()}
    out["longer"] = tracer.generate(state, max_new_tokens=NEW + 9).arrays()  # grows past the prefill's reserve
    mask = np.zeros(lm.layout.shape, bool)
    mask[-1, ::2] = mask[0, 1] = True
    for method in ("zero", "uniform"):
        out[method] = tracer.generate(state, intervention=lambda v: mask, ablation=method).arrays()
    partial = tracer.prefill(ids[:SPAN[1]], {"needle": [SPAN]})
    hidden = np.zeros(len(ids), bool)
    hidden[SPAN[0]:SPAN[1]] = True
    partial.hidden_keys = hidden
    tracer.extend(partial, ids[SPAN[1]:], hidden_keys=hidden)
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
        except ModelError as exc:  # a per-head term (gpt_oss sinks) is refused mid-step, the same way with either cache
            out[f"sparse_{unit}"] = {"refused": np.array(str(exc))}
    return out


@pytest.mark.parametrize("family", EXACT)
def test_every_family_records_the_same_with_the_in_place_cache(family, monkeypatch):
    model = build_tiny(family)
    lm = LoadedModel(model, None, HeadLayout.from_config(model.config), family, "", family)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (PROMPT_LEN,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    old, new = both_caches(monkeypatch, lambda: _workload(lm, ids))
    assert sorted(old) == sorted(new)
    for condition in old:
        assert_same_arrays(old[condition], new[condition], f"{family}/{condition}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_eager_stock_records_the_same(family, monkeypatch):
    """Forced eager (the default families of the table run sdpa): repeat_kv and the eager matmuls on the views."""
    model = build_tiny(family, attn_implementation="eager")
    lm = LoadedModel(model, None, HeadLayout.from_config(model.config), family, "", family)
    ids = torch.randint(3, 97, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2)).tolist()
    old, new = both_caches(monkeypatch, lambda: _workload(lm, ids))
    for condition in old:
        assert_same_arrays(old[condition], new[condition], f"{family}-eager/{condition}")


# --- whole run folders on the named models ---------------------------------------------------
def _niah_folders(lm, tmp_path, monkeypatch, lengths, depths, **trace):
    from dynheads.experiments.trace import run_niah
    from dynheads.tasks.niah import NiahConfig

    niah = NiahConfig(lengths=lengths, depths=depths, samples_per_cell=1)
    folders = iter([tmp_path / "old", tmp_path / "new"])
    return both_caches(monkeypatch, lambda: run_niah(lm, niah, next(folders), TraceConfig(**trace), quiet=True).path)


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
    old, new = _niah_folders(default_lm, tmp_path, monkeypatch, (400,), (0, 100), topk=3, max_new_tokens=24)
    assert_same_run_folders(old, new)


def test_gemma_niah_run_folders_are_identical_past_the_sliding_window(gemma_lm, tmp_path, monkeypatch):
    old, new = _niah_folders(gemma_lm, tmp_path, monkeypatch, (700,), (0,), topk=3, max_new_tokens=24)
    assert_same_run_folders(old, new)


def test_default_model_sparse_tokens_are_identical(default_lm, monkeypatch):
    """Head-sparse decoding on the real model: k = 8 of 90 KV heads open, the rest gather sinks + window."""
    from dynheads.tasks.niah import NiahConfig, niah_samples

    enc = next(niah_samples(default_lm.tokenizer, NiahConfig(lengths=(400,), depths=(50,), samples_per_cell=1)))
    tracer = Tracer(default_lm, TraceConfig(max_new_tokens=16, record_rows=False))
    opened = np.zeros(default_lm.layout.shape[:1] + (default_lm.layout.n_kv_heads,), bool)
    opened.flat[:8] = True

    def sparse():
        trace = tracer.generate(tracer.prefill(enc.input_ids), heads=lambda t, p, f: opened, sparsity=Sparsity())
        return trace.arrays()

    old, new = both_caches(monkeypatch, sparse)
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
