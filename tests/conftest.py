"""Shared fixtures: tiny random models built from configs (fast, exact) and the embedded default model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


class NoTemplateTokenizer:
    """Stands in for a tokenizer in raw-id tracer tests (no chat template, no eos)."""

    eos_token_id = None
    chat_template = None
    all_special_ids: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


def tiny_config(arch: str = "llama"):
    """A 2-layer GQA config (4 query heads, 2 KV heads, hidden 64) of the given architecture."""
    from transformers import AutoConfig

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return AutoConfig.for_model(arch, **common)


def make_tiny_lm(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    from dynheads.heads import HeadLayout
    from dynheads.models import LoadedModel

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    return LoadedModel(model, NoTemplateTokenizer(), HeadLayout.from_config(cfg), f"tiny-{arch}", "", f"tiny-{arch}")


@pytest.fixture
def tiny_lm():
    return make_tiny_lm("llama")


@pytest.fixture(scope="session")
def default_lm():
    """The embedded SmolLM2-135M-Instruct (converted once and cached)."""
    from dynheads.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def gemma_lm():
    """Gemma 3 270M base (installed by `make setup`; reassembled, checked and converted once)."""
    from dynheads.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository (../shared/data). A test that needs it skips, naming the
    folder, on a clone without it; CI sets DYNHEADS_REQUIRE_SHARED_DATA=1, so there a missing folder fails."""
    if not SHARED_DATA.is_dir():
        message = f"needs the shared data folder {SHARED_DATA}, which is absent"
        if os.environ.get("DYNHEADS_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " (DYNHEADS_REQUIRE_SHARED_DATA=1)")
        pytest.skip(message)
    return SHARED_DATA
