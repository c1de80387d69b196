"""Gemma 3 270M base, the second named model, on its real weights: prompts past its 512-token sliding
window with the needle inside and beyond it. Traced tokens equal `generate`; every step's top-1
position and needle mass equal eager `output_attentions`; forks, per-step ablation, and the window."""
import numpy as np
import pytest
import torch

from e2e.helpers import dynheads

pytestmark = pytest.mark.e2e
LENGTH = 700  # > the 512-token window: depth 0 puts the needle beyond it, depth 100 inside it


@pytest.fixture(scope="module")
def traced(gemma_lm):
    """Both samples traced once: (encoded sample, tracer, prefilled state, trace, record arrays)."""
    from dynheads.scores.copy_paste import copy_paste_score
    from dynheads.tasks.niah import NiahConfig, niah_samples
    from dynheads.tracing.tracer import TraceConfig, Tracer

    samples = list(niah_samples(gemma_lm.tokenizer, NiahConfig(lengths=(LENGTH,), depths=(0, 100),
                                                               samples_per_cell=1)))
    tracer = Tracer(gemma_lm, TraceConfig(max_new_tokens=40, stop_at_newline=True))
    out = []
    for enc in samples:
        state = tracer.prefill(enc.input_ids, enc.token_spans)
        trace = tracer.generate(state)
        arrays = trace.arrays()
        arrays["score"] = copy_paste_score(arrays, enc.token_spans)
        out.append((enc, tracer, state, trace, arrays))
    return out


def test_base_model_gets_a_completion_prompt_it_answers(traced, gemma_lm):
    for enc, _, _, trace, _ in traced:
        assert enc.input_ids[0] == gemma_lm.tokenizer.bos_token_id  # the tokenizer's own special-token rule
        assert enc.prompt_text.endswith("\n\nQuestion: What is the magic word?\nAnswer:")
        assert enc.sample.prompt.style == "completion" and enc.prompt_len == LENGTH
        s, e = enc.token_spans["needle"][0]
        assert gemma_lm.tokenizer.decode(enc.input_ids[s:e]).strip() == enc.sample.metadata["needle"]
        response = gemma_lm.tokenizer.decode(trace.token_ids)
        assert enc.sample.answer in response and "\n" not in response  # answered; stopped at the line break
        assert trace.stop_id is not None and "\n" in gemma_lm.tokenizer.decode([trace.stop_id])


def test_traced_tokens_equal_generate_and_rows_equal_eager(traced, gemma_lm):
    model = gemma_lm.model
    for enc, _, _, trace, arrays in traced:
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            plain = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=len(trace.token_ids) + 1, eos_token_id=None, pad_token_id=0)
        assert plain[0, LENGTH:].tolist() == trace.token_ids + [trace.stop_id]
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = model(torch.tensor([enc.input_ids + trace.token_ids]), output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
        start = LENGTH - 1
        rows = torch.stack([a[0, :, start: start + len(trace.token_ids)] for a in out.attentions])  # [L, H, T, S]
        rows = rows.permute(2, 0, 1, 3).float().numpy()
        assert (arrays["top1_pos"] == rows.argmax(-1)).all()
        s, e = enc.token_spans["needle"][0]
        np.testing.assert_allclose(arrays["mass_needle"], rows[..., s:e].sum(-1), atol=1e-4, rtol=0)


def test_fork_and_per_step_ablation(traced, gemma_lm):
    from dynheads.scores.copy_paste import copy_paste_active

    enc, tracer, state, trace, arrays = traced[0]
    again = tracer.generate(state).arrays()
    assert all(np.array_equal(arrays[k], again[k]) for k in again)  # the prefill forked, not consumed

    def mask_copy_heads(view):
        step = {k: v[None] for k, v in view.arrays.items()} | {"token_id": np.array([view.token_id])}
        return copy_paste_active(step, enc.token_spans)[0]

    ablated = tracer.generate(state, intervention=mask_copy_heads).arrays()
    masked_any = ablated["ablated"].any(axis=(1, 2))
    assert masked_any.any()  # the needle's copy heads were found and masked at some steps
    assert np.array_equal(ablated["clean_token_id"][0], arrays["token_id"][0])
    assert not np.array_equal(ablated["token_id"], arrays["token_id"][: len(ablated["token_id"])]) or \
        len(ablated["token_id"]) != len(arrays["token_id"])  # masking the copy heads changes the answer


def test_sliding_layers_never_retrieve_outside_their_window(traced, gemma_lm):
    layout = gemma_lm.layout
    assert layout.sliding_window == 512 and layout.global_layers == (5, 11, 17)
    sliding = np.array(layout.sliding_layers)
    beyond_copies = 0
    for enc, _, _, _, arrays in traced:
        query = LENGTH - 1 + np.arange(len(arrays["token_id"]))  # the position each step's query sits at
        assert ((query[:, None, None] - arrays["top1_pos"][:, sliding]) < 512).all()
        s, e = enc.token_spans["needle"][0]
        beyond = query - (e - 1) >= 512
        assert not (arrays["score"][beyond][:, sliding] > 0).any()  # the invariant
        beyond_copies += int((arrays["score"][beyond] > 0).sum())
    assert beyond_copies > 0  # depth 0: the needle is copied from beyond the window, by global layers only


def test_cli_runs_gemma_with_the_auto_style_and_reports_hybrid_attention(tmp_path):
    out = tmp_path / "g"
    proc = dynheads("--threads", "2", "niah", "--model", "gemma3-270m", "--lengths", "600", "--depths", "0",
                    "--samples-per-cell", "1", "--max-new-tokens", "40", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 samples: accuracy 1.000" in proc.stdout
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["task"]["prompt_style"] == "completion" and config["trace"]["stop_at_newline"]
    assert config["layout"]["sliding_layers"] == [i for i in range(18) if i not in (5, 11, 17)]
    refused = dynheads("niah", "--model", "gemma3-270m", "--lengths", "600", "--depths", "0", "--samples-per-cell",
                       "1", "--prompt-style", "chat", "--out", tmp_path / "chat")
    assert refused.returncode == 2 and "no chat template" in refused.stderr and not (tmp_path / "chat").exists()
    dyn = dynheads("dynamism", out)
    assert dyn.returncode == 0, dyn.stderr[-2000:]
    assert "hybrid attention: window 512, global layers [5, 11, 17]" in dyn.stdout
    assert "outside their window: 0" in dyn.stdout
    hybrid = json.loads((out / "results" / "hybrid.json").read_text())
    beyond = {b["name"]: b for b in hybrid["bins"]}["beyond"]
    assert beyond["n_copy_steps"] > 0 and beyond["global_share"]["estimate"] == 1.0
