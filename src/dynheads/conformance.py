"""Architecture conformance: is tracing exact on a model family, or refused, and why.

For one decoder family of the installed transformers, a tiny model is built from a config with a
fixed seed, in the attention implementation transformers picks for it (its stock one). A random
prompt is traced and compared with what transformers itself computes:
  - the traced tokens against `model.generate` (greedy, same cache semantics);
  - every step's top-1 position and needle-span mass against eager `output_attentions`;
  - a fork of the same prefill repeats the records exactly (the KV cache was cropped back);
  - an ablation run (every head of one layer zeroed at every step) completes and a run with an
    empty mask equals the clean one.
Prompts are longer than the tiny sliding window, so sliding-window layers are exercised past it.
`dynheads conformance` prints the support table in the README from these results.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dynheads.errors import DynheadsError

# Families the README names; each with what it needs to be tiny (and its sliding window small).
FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": {"sliding_window": 16}, "mixtral": {"sliding_window": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    "qwen3": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "phi3": {"sliding_window": 16}, "gemma": {}, "gemma2": {"sliding_window": 16},
    "gemma3_text": {"sliding_window": 16, "sliding_window_pattern": 2}, "olmo2": {}, "granite": {},
    "cohere": {}, "cohere2": {"sliding_window": 16}, "starcoder2": {"sliding_window": 16},
    "gpt_neox": {}, "gpt2": {}, "falcon": {}, "gpt_oss": {"sliding_window": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "phi": {}, "olmo": {}, "stablelm": {}, "smollm3": {}, "exaone4": {"sliding_window": 16},
    "gptj": {"rotary_dim": 8}, "codegen": {"rotary_dim": 8}, "bloom": {}, "mpt": {},
}
PROMPT_LEN, NEW_TOKENS, SPAN = 40, 12, (10, 18)


@dataclass
class Conformance:
    """One family's verdict with the measurements behind it."""

    family: str
    status: str  # exact | refused (one-line reason) | differs | fails (crashed) | unbuildable
    reason: str = ""
    stock: str = ""  # the attention implementation transformers chose for it
    features: list[str] = field(default_factory=list)  # sliding window, sinks, soft-cap, …
    tokens_equal: bool = False
    top1_mismatches: int = -1  # of steps × layers × heads
    mass_max_error: float = float("nan")
    fork_equal: bool = False
    ablation_ok: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def tiny_config(family: str, **overrides):
    """A 2-layer GQA config (4 query heads, 2 KV heads, hidden 64) of the given family."""
    import inspect

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    config_class = CONFIG_MAPPING[family]
    if ("num_key_value_heads" not in inspect.signature(config_class.__init__).parameters
            and "num_key_value_heads" not in getattr(config_class, "attribute_map", {})):
        del kwargs["num_key_value_heads"]  # a multi-head-only family (gpt2, gpt_neox, …)
    kwargs.update(FAMILIES.get(family, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_tiny(family: str, seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A tiny random model of `family` in fp32 eval mode (its stock attention unless one is asked)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **extra).eval()


def check_family(family: str, attn_implementation: str | None = None) -> Conformance:
    """Trace a tiny `family` model and compare with transformers' own generate and eager attentions."""
    try:
        model = build_tiny(family, attn_implementation=attn_implementation)
    except Exception as exc:  # a family whose config cannot be made tiny this way
        return Conformance(family, "unbuildable", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    result = Conformance(family, "", stock=model.config._attn_implementation, features=_features(model.config))
    try:
        _compare(model, result)
    except DynheadsError as exc:
        result.status, result.reason = "refused", str(exc)
        return result
    except Exception as exc:  # a crash is a failure of dynheads on this family, reported as such
        result.status, result.reason = "fails", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return result
    exact = (result.tokens_equal and result.top1_mismatches == 0 and result.mass_max_error < 1e-4
             and result.fork_equal and result.ablation_ok)
    result.status = "exact" if exact else "differs"
    return result


def causal_lm_families() -> list[str]:
    """Every model type the installed transformers maps to a causal LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def support_table(results: list[Conformance]) -> str:
    """The README's markdown support table."""
    lines = ["| family | stock attention | features | status | why |", "|---|---|---|---|---|"]
    for r in results:
        why = r.reason if r.status != "exact" else (
            f"tokens = generate; top-1 {r.top1_mismatches} differ; span mass err {r.mass_max_error:.1e}; fork, ablation ok")
        lines.append(f"| {r.family} | {r.stock or '—'} | {', '.join(r.features) or '—'} | {r.status} | {why} |")
    return "\n".join(lines)


# --- internals -----------------------------------------------------------------------------
def _features(config) -> list[str]:
    cfg = config.get_text_config()
    out = []
    if getattr(cfg, "sliding_window", None) and (getattr(cfg, "use_sliding_window", True) is not False):
        out.append(f"sliding window {cfg.sliding_window}")
    if getattr(cfg, "attn_logit_softcapping", None):
        out.append("logit soft-cap")
    if cfg.model_type == "gpt_oss":
        out.append("attention sinks")
    if getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) != cfg.num_attention_heads:
        out.append("GQA")
    return out


def _compare(model, result: Conformance) -> None:
    from dynheads.heads import HeadLayout
    from dynheads.models import LoadedModel
    from dynheads.tracing.tracer import TraceConfig, Tracer

    layout = HeadLayout.from_config(model.config)
    lm = LoadedModel(model, None, layout, result.family, "", result.family)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (1, PROMPT_LEN),
                        generator=torch.Generator().manual_seed(1))
    tracer = Tracer(lm, TraceConfig(max_new_tokens=NEW_TOKENS, topk=3, record_hidden=False))
    tracer.stop_ids = set()
    state = tracer.prefill(ids[0].tolist(), {"needle": [SPAN]})
    trace = tracer.generate(state)
    arrays = trace.arrays()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    result.tokens_equal = trace.token_ids == plain[0, PROMPT_LEN:].tolist()
    rows = _eager_rows(model, ids, trace.token_ids)  # [T, L, H, S]
    result.top1_mismatches = int((arrays["top1_pos"] != rows.argmax(-1).numpy()).sum())
    mass = rows[..., SPAN[0]:SPAN[1]].sum(-1).numpy()
    result.mass_max_error = float(np.abs(arrays["mass_needle"] - mass).max())
    again = tracer.generate(state).arrays()
    result.fork_equal = all(np.array_equal(arrays[k], again[k]) for k in arrays)
    result.ablation_ok = _ablation_works(tracer, state, layout, arrays)


def _eager_rows(model, ids, generated) -> torch.Tensor:
    """Attention rows of the queries that produced each generated token, from eager output_attentions."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        full = torch.cat([ids, torch.tensor([generated])], 1)
        with torch.no_grad():
            out = model(full, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    start = ids.shape[1] - 1
    rows = torch.stack([a[0, :, start: start + len(generated)] for a in out.attentions])  # [L, H, T, S]
    return rows.permute(2, 0, 1, 3).float()


def _ablation_works(tracer, state, layout, clean: dict) -> bool:
    """An empty mask reproduces the clean run; masking a whole layer at every step runs to the end."""
    empty = tracer.generate(state, intervention=lambda view: None).arrays()
    same = np.array_equal(empty["clean_token_id"], clean["token_id"]) and np.array_equal(
        empty["masked_top1_pos"], clean["top1_pos"])
    mask = np.zeros(layout.shape, bool)
    mask[-1] = True
    masked = tracer.generate(state, intervention=lambda view: mask).arrays()
    return bool(same and masked["ablated"].shape == (NEW_TOKENS, *layout.shape) and masked["ablated"][:, -1].all())
