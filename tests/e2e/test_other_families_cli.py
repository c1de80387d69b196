"""A user's own model of another family through the CLI: a tiny Gemma-2 (eager stock attention,
logit soft-cap, sliding window 16) saved as a local folder runs `niah` and `ablate` end to end,
forking its prefill and ablating long past the window."""
import json

import numpy as np
import pytest


from e2e.helpers import assert_one_line_error, dynheads

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory, default_lm):
    from dynheads.conformance import build_tiny

    folder = tmp_path_factory.mktemp("tiny-gemma2")
    tok = default_lm.tokenizer
    model = build_tiny("gemma2", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_tiny_gemma2_folder_traces_and_ablates(gemma2_folder, tmp_path):
    common = ["--model", gemma2_folder, "--lengths", "200", "--depths", "50", "--samples-per-cell", "1",
              "--max-new-tokens", "6", "--quiet"]
    trace = dynheads("niah", *common, "--out", tmp_path / "niah", env_extra={"OMP_NUM_THREADS": "1"})
    assert trace.returncode == 0, trace.stderr[-2000:]
    config = json.loads((tmp_path / "niah" / "config.json").read_text())
    assert config["model"]["attn_implementation"] == "eager"  # transformers gives Gemma-2 no SDPA path
    with np.load(next((tmp_path / "niah" / "records").glob("*.npz"))) as z:
        assert z["top1_pos"].shape[1:] == (2, 4) and (z["top1_pos"] < 200 + 6).all()
    abl = dynheads("ablate", *common, "--n-boot", "50", "--out", tmp_path / "abl", env_extra={"OMP_NUM_THREADS": "1"})
    assert abl.returncode == 0, abl.stderr[-2000:]
    result = json.loads((tmp_path / "abl" / "results" / "ablation.json").read_text())
    assert set(result["conditions"]) >= {"none", "dynamic", "static", "random"}


def test_family_without_attention_interface_is_refused_before_the_run_folder(default_lm, tmp_path):
    from dynheads.conformance import build_tiny

    tok = default_lm.tokenizer
    build_tiny("bloom", vocab_size=len(tok)).save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    proc = dynheads("niah", "--model", tmp_path / "bloom", "--lengths", "200", "--depths", "50",
                    "--samples-per-cell", "1", "--out", tmp_path / "run")
    assert_one_line_error(proc, "BloomForCausalLM", "AttentionInterface")
    assert not (tmp_path / "run").exists()
