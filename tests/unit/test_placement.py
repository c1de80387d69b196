"""Models placed by accelerate (CPU/disk offload) trace, ablate and mask keys exactly like undispatched ones."""
import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from dynheads.errors import ConfigError
from dynheads.placement import Placement, dispatch, parse_placement
from dynheads.tracing.tracer import TraceConfig, Tracer

IDS = torch.randint(3, 97, (48,), generator=torch.Generator().manual_seed(3)).tolist()
SPANS = {"needle": [(10, 18)]}


def _traces(lm):
    """Plain trace, a per-step ablation of two heads (zero and uniform), and a trace with hidden keys."""
    tracer = Tracer(lm, TraceConfig(max_new_tokens=6))
    state = tracer.prefill(IDS, SPANS)
    mask = np.zeros(lm.layout.shape, bool)
    mask[0, 1] = mask[1, 3] = True
    out = {"plain": tracer.generate(state).arrays()}
    for method in ("zero", "uniform"):
        out[method] = tracer.generate(state, intervention=lambda view: mask, ablation=method).arrays()
    hidden = np.zeros(len(IDS), bool)
    hidden[10:18] = True
    out["hidden_keys"] = tracer.generate(tracer.prefill(IDS, SPANS, hidden_keys=hidden)).arrays()
    return out


def _assert_same(a, b):
    for cond in a:
        assert sorted(a[cond]) == sorted(b[cond])
        for name in a[cond]:
            np.testing.assert_array_equal(a[cond][name], b[cond][name], err_msg=f"{cond}/{name}")


@pytest.mark.parametrize("placement", ["explicit", "auto"])
def test_offloaded_model_traces_to_the_same_records(placement, tmp_path):
    reference = _traces(make_tiny_lm("llama"))
    lm = make_tiny_lm("llama")  # same seed: same weights
    if placement == "explicit":  # layer 1 and the LM head on disk, the rest in CPU memory
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                      "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
        lm.model = dispatch(lm.model, Placement(device_map, None, str(tmp_path)))
    else:  # accelerate's own map under a CPU cap small enough to push the later layers to disk
        lm.model = dispatch(lm.model, Placement("sequential", {"cpu": "200KB"}, str(tmp_path)))
    assert "disk" in lm.model.hf_device_map.values() and list(tmp_path.glob("*.dat"))
    assert any(p.device.type == "meta" for p in lm.model.parameters())  # offloaded weights are not in memory
    _assert_same(reference, _traces(lm))


def test_placement_flags_are_parsed_and_bad_ones_are_config_errors(tmp_path):
    assert parse_placement(None) is None
    p = parse_placement("balanced", "0=20GiB,cpu=60GiB", str(tmp_path))
    assert p == Placement("balanced", {0: "20GiB", "cpu": "60GiB"}, str(tmp_path))
    assert p.from_pretrained_args() == {"device_map": "balanced", "max_memory": {0: "20GiB", "cpu": "60GiB"},
                                        "offload_folder": str(tmp_path)}
    assert parse_placement('{"model.layers.0": "0", "lm_head": "disk"}').device_map == {"model.layers.0": 0,
                                                                                          "lm_head": "disk"}
    f = tmp_path / "map.json"
    f.write_text('{"model": "cuda:1"}')
    assert parse_placement(str(f), '{"1": "8GiB"}').max_memory == {1: "8GiB"}
    for args, message in [(("everywhere",), "--device-map expects"), (('{"model": "gpu"}',), "use a GPU index"),
                          (("auto", "0=lots"), "DEVICE=SIZE"), ((None, "0=1GiB"), "need --device-map")]:
        with pytest.raises(ConfigError, match=message):
            parse_placement(*args)
