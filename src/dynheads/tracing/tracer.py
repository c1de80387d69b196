"""Traced greedy generation: the only loop in dynheads that calls the model step by step.

A prompt is prefilled once with SDPA (all tokens but the last). Every generation step then feeds
one token; the last prompt token is step 0's input, so every step — including the one that emits
the first answer token — is the same single-row forward whose attention row is reduced to
per-head records. Conditions that differ only while decoding (ablations, head strategies) fork
the same prefill: `generate(..., fork=True)` crops the KV cache back when it returns.

Per step, an optional intervention sees the clean step and returns heads to ablate; the step is
then recomputed with those heads masked (cache cropped by one and the token re-fed) and the
masked pass's token is kept, so later steps see its keys and values.

Head-sparse decoding (`heads=`, sparse.py) runs in the same loop: before each step a policy opens
some heads (all others read only sinks + recent keys); a policy that needs the step's own full pass
(the oracle) gets it first, and the step is then recomputed sparse the same way (crop by one).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from transformers import DynamicCache

from dynheads.errors import ModelError
from dynheads.interventions.methods import ablations
from dynheads.models import LoadedModel, end_of_turn_ids
from dynheads.tracing.attention import StepHooks, reduce_rows, tracing
from dynheads.tracing.cache import croppable_cache, ensure_capacity, prefill_chunks
from dynheads.tracing.sparse import Sparsity, plan_step


@dataclass(frozen=True)
class TraceConfig:
    """What the tracer computes and keeps at each step."""

    max_new_tokens: int = 48  # NIAH answers (a UUID) fit in ~40 tokens of SmolLM2's tokenizer
    topk: int = 1  # >1 also records topk_pos / topk_weight
    record_hidden: bool = True  # final hidden state (post final norm = the LM head's input)
    sink_tokens: int = 4  # Eq. 2: attention-sink positions left out of the denominator (paper silent)
    local_window: int = 32  # Eq. 2: most recent positions left out of the denominator (paper silent)
    mass_spans: tuple[str, ...] = ("needle",)  # named spans whose attention mass is recorded
    row_spans: tuple[str, ...] = ()  # named spans whose per-position weights are recorded
    record_rows: bool = True  # reduce every head's newest attention row; False skips that O(context) work
    stop_at_newline: bool = False  # completion prompts: the answer ends at its first line break (Wu et al.'s rule)


@dataclass
class StepView:
    """What one forward step saw and would emit; per-head arrays are [layers, heads]."""

    step: int
    token_id: int  # greedy token of this pass
    entropy: float
    logprob: float
    arrays: dict[str, np.ndarray]
    hidden: np.ndarray | None = None


@dataclass
class DecodeState:
    """A prefilled prompt: all ids so far (the last one not yet in the cache) and the KV cache."""

    ids: list[int]
    cache: DynamicCache
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    hidden_keys: np.ndarray | None = None  # bool [len]: context positions hidden from later queries


# Gets the clean step and returns bool [layers, heads] (heads to ablate) or None.
Intervention = Callable[[StepView], "np.ndarray | None"]
# Gets (step t, the previous kept step or None, step t's full pass or None) and returns
# bool [layers, units]: the heads that read every key at step t (head-sparse decoding).
HeadPolicy = Callable[[int, "StepView | None", "StepView | None"], np.ndarray]


@dataclass
class Trace:
    """One generation. `steps` is the kept path; with an intervention, `clean` and `masks` too."""

    steps: list[StepView]
    stop_id: int | None
    clean: list[StepView] | None = None
    masks: list[np.ndarray] | None = None
    open_heads: list[np.ndarray] | None = None  # head-sparse decoding: bool [layers, units] per step run (the stop step too)
    shape: tuple[int, int] = (0, 0)  # (layers, heads)

    @property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]

    def arrays(self) -> dict[str, np.ndarray]:
        """Stack the steps into record arrays (see records.py for names and shapes)."""
        out = _stack(self.steps)
        if self.clean is not None and not self.clean:  # stopped at the first step: nothing was ablated
            out["ablated"] = np.zeros((0, *self.shape), bool)
        elif self.clean is not None:
            clean = _stack(self.clean)
            out = {("masked_" + k if k in ("top1_pos", "top1_token") else k): v for k, v in out.items()}
            out.update({k: v for k, v in clean.items() if k not in ("token_id", "token_entropy", "token_logprob")})
            out["clean_token_id"] = clean["token_id"]
            out["ablated"] = np.stack(self.masks) if self.masks else np.zeros((0,) + clean["top1_pos"].shape[1:], bool)
        return out


class Tracer:
    """Greedy traced decoding over one loaded model."""

    def __init__(self, lm: LoadedModel, config: TraceConfig = TraceConfig()):
        self.lm = lm
        self.config = config
        self.stop_ids = set(end_of_turn_ids(lm.tokenizer, lm.model))
        self.device = input_device(lm.model)
        self._breaks: dict[int, bool] = {}  # token id -> its text holds a line break (stop_at_newline)

    # --- prefill -----------------------------------------------------------------------
    def prefill(self, input_ids: list[int], spans: dict[str, list[tuple[int, int]]] | None = None,
                hidden_keys: np.ndarray | None = None) -> DecodeState:
        """Run all prompt tokens but the last through SDPA into a fresh KV cache (with room for the answer)."""
        cache = croppable_cache(self.lm.model.config, reserve=len(input_ids) - 1 + self.config.max_new_tokens)
        state = DecodeState(list(input_ids), cache, dict(spans or {}), hidden_keys)
        self.extend(state, [], hidden_keys=hidden_keys)
        return state

    def extend(self, state: DecodeState, new_ids: list[int], hidden_keys: np.ndarray | None = None) -> None:
        """Append tokens and bring the cache up to all but the last id.

        Under SDPA, more than ONE_CALL (cache.py, 8,192) tokens go through the model in chunks that end
        at multiples of PREFILL_CHUNK (2,048; more than 2,048 on models with sliding-window layers, whose
        one call would read every key behind the window): a 32K-token prompt then never builds SDPA's [32K, 32K]
        mask (1 GiB as bool, 4 GiB as the float mask the CPU kernel converts it to), full-attention
        layers compute [chunk, end] rectangles instead of the whole square behind the mask, and
        sliding-window layers only the key blocks from each chunk's first window on.
        The keys and values are bit-identical to one call (tested): every chunk ends on SDPA's
        512-key block boundary, so each query row sums the same blocks in the same order, plus exact
        zeros. Eager attention runs in one call: its softmax row grows with the chunk's keys, and a
        term appended after them (gpt_oss's sinks) lands in another vector lane (not bit-identical).
        """
        state.ids.extend(new_ids)
        start, end = state.cache.get_seq_length(), len(state.ids) - 1
        if start >= end:
            return
        hooks = StepHooks(seq_len=end, hidden_keys=_as_mask(hidden_keys, end))
        with tracing(self.lm.model, hooks), torch.inference_mode():
            windowed = bool(self.lm.layout.sliding_layers)
            for lo, hi in prefill_chunks(start, end, windowed=windowed) if hooks.stock == "sdpa" else [(start, end)]:
                hooks.seq_len = hi
                self.lm.model(input_ids=torch.tensor([state.ids[lo:hi]], device=self.device), cache=state.cache,
                              use_cache=True, logits_to_keep=1)
        self._check_coverage(hooks.layers_seen)

    # --- decoding ----------------------------------------------------------------------
    def generate(self, state: DecodeState, *, max_new_tokens: int | None = None,
                 intervention: Intervention | None = None, ablation: str = "zero",
                 stop: Callable[[list[int]], bool] | None = None, fork: bool = True,
                 heads: HeadPolicy | None = None, sparsity: Sparsity = Sparsity(), full_pass_first: bool = False
                 ) -> Trace:
        """Greedy decoding from `state`; with fork=True the state is restored afterwards.

        heads: head-sparse decoding with this policy (needs TraceConfig(record_rows=False): a sparse
        step records no rows); full_pass_first shows the policy step t's full pass before it decides.
        """
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if heads is not None and (intervention is not None or self.config.record_rows):
            raise ModelError("head-sparse decoding takes no intervention and needs TraceConfig(record_rows=False)")
        start_ids = len(state.ids)
        ensure_capacity(state.cache, start_ids - 1 + limit)  # the cache holds all ids but the last
        ablate_fn = ablations.get(ablation)
        kept: list[StepView] = []
        clean_steps: list[StepView] = []
        masks: list[np.ndarray] = []
        opened: list[np.ndarray] = []
        stop_id = None
        with self._recording(state) as run_step:
            for t in range(limit):
                if heads is None:
                    view = run_step(t, None, ablate_fn)
                else:
                    full = None
                    if full_pass_first:
                        full = run_step(t, None, ablate_fn, record=True)
                        state.cache.crop(-1)
                    choice = heads(t, kept[-1] if kept else None, full)
                    if callable(choice):  # decided per layer inside the step (an IN_LAYER head set)
                        decided: dict[int, np.ndarray] = {}
                        view = run_step(t, None, ablate_fn, open_heads=(_noting(choice, decided), sparsity))
                        opened.append(self._decisions(decided, sparsity))
                    else:
                        opened.append(np.asarray(choice, bool))
                        view = run_step(t, None, ablate_fn, open_heads=(opened[-1], sparsity))
                if intervention is not None:
                    mask = intervention(view)
                    mask = np.zeros(self.lm.layout.shape, bool) if mask is None else np.asarray(mask, bool)
                    clean_steps.append(view)
                    masks.append(mask)
                    if mask.any():
                        state.cache.crop(-1)
                        view = run_step(t, mask, ablate_fn)
                if view.token_id in self.stop_ids or self._ends_line(view.token_id, state.ids[start_ids:]):
                    stop_id = view.token_id
                    break
                kept.append(view)
                state.ids.append(view.token_id)
                if stop is not None and stop(state.ids[start_ids:]):
                    break
        if intervention is not None and stop_id is not None:
            clean_steps.pop(), masks.pop()  # the stop step is not an answer token
        trace = Trace(kept, stop_id, clean_steps if intervention else None, masks if intervention else None,
                      opened if heads is not None else None, self.lm.layout.shape)
        if fork:
            self.rewind(state, start_ids)
        return trace

    def _decisions(self, decided: dict[int, np.ndarray], sparsity: Sparsity) -> np.ndarray:
        """bool [layers, units] of one step decided per layer (a layer that made no sparse call: all open)."""
        layout = self.lm.layout
        units = sparsity.units(layout.n_heads, layout.n_kv_heads)
        return np.stack([np.asarray(decided.get(i, np.ones(units, bool)), bool) for i in range(layout.n_layers)])

    def rewind(self, state: DecodeState, n_ids: int) -> None:
        """Forget everything after the first `n_ids` ids (the cache keeps n_ids - 1 tokens)."""
        extra = state.cache.get_seq_length() - (n_ids - 1)
        if extra > 0:
            state.cache.crop(-extra)
        del state.ids[n_ids:]

    # --- internals ---------------------------------------------------------------------
    def _ends_line(self, token_id: int, answer: list[int]) -> bool:
        """With stop_at_newline: the token breaks the line after some non-blank answer text (it is not kept,
        like an end-of-turn token; a line break before any text is part of the answer)."""
        if not self.config.stop_at_newline:
            return False
        if token_id not in self._breaks:
            self._breaks[token_id] = "\n" in self.lm.tokenizer.decode([token_id])
        if not self._breaks[token_id]:
            return False
        before = self.lm.tokenizer.decode(answer) + self.lm.tokenizer.decode([token_id]).split("\n")[0]
        return bool(before.strip())

    def _check_coverage(self, layers_seen: set[int]) -> None:
        """Refuse a model whose layers do not all compute attention through the traced function."""
        expected = set(range(self.lm.layout.n_layers))
        if layers_seen != expected:
            missing = sorted(expected - layers_seen)
            raise ModelError(f"{type(self.lm.model).__name__}: layers {missing[:5]} do not compute attention through "
                             "transformers' AttentionInterface, so dynheads cannot trace them")

    @contextlib.contextmanager
    def _recording(self, state: DecodeState) -> Iterator[Callable]:
        cfg, model = self.config, self.lm.model
        hooks = StepHooks(record=cfg.record_rows, topk=cfg.topk, sink_tokens=cfg.sink_tokens, local_window=cfg.local_window)
        hooks.spans = {n: state.spans[n] for n in cfg.mass_spans if n in state.spans}
        hooks.row_spans = {n: [p for s, e in state.spans[n] for p in range(s, e)]
                           for n in cfg.row_spans if n in state.spans}
        captured_hidden: list[torch.Tensor] = []
        handle = None
        if cfg.record_hidden:
            lm_head = model.get_output_embeddings()
            handle = lm_head.register_forward_pre_hook(lambda _m, args: captured_hidden.append(args[0][0, -1]))

        def run_step(t: int, mask: np.ndarray | None, ablate_fn, record: bool = cfg.record_rows,
                     open_heads: tuple[np.ndarray, Sparsity] | None = None) -> StepView:
            seq_len = state.cache.get_seq_length() + 1
            hooks.seq_len, hooks.captured, hooks.record = seq_len, {}, record and open_heads is None
            hooks.residual = {}
            deciding = open_heads is not None and callable(open_heads[0])
            hooks.decide = open_heads[0] if deciding else None
            hooks.open_heads = None if open_heads is None or deciding else plan_step(
                open_heads[0], open_heads[1], self.lm.layout.n_heads, self.lm.layout.n_kv_heads)
            hooks.sparsity = None if open_heads is None else open_heads[1]
            hooks.head_mask = None if mask is None else torch.from_numpy(mask)
            hooks.ablation = ablate_fn
            hooks.hidden_keys = _as_mask(state.hidden_keys, seq_len)
            captured_hidden.clear()
            out = model(input_ids=torch.tensor([[state.ids[seq_len - 1]]], device=self.device),
                        cache=state.cache, use_cache=True, logits_to_keep=1)
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            token = int(logp.argmax())
            arrays = {}
            if hooks.record:
                if len(hooks.captured) != self.lm.layout.n_layers:
                    self._check_coverage(set(hooks.captured))
                arrays = {name: value.cpu().numpy() for name, value in reduce_rows(hooks, self.lm.layout.n_layers).items()}
                arrays["top1_token"] = np.asarray(state.ids[:seq_len])[arrays["top1_pos"]]
            hidden = captured_hidden[-1].float().cpu().numpy() if captured_hidden else None
            entropy = float(-(logp.exp() * logp).sum())
            return StepView(t, token, entropy, float(logp[token]), arrays, hidden)

        try:
            with tracing(model, hooks), torch.inference_mode():
                yield run_step
        finally:
            if handle is not None:
                handle.remove()


def input_device(model) -> torch.device:
    """Where input ids go: the input embeddings' execution device (accelerate offload keeps weights on meta)."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else embeddings.weight.device


def _as_mask(hidden_keys: np.ndarray | None, length: int) -> torch.Tensor | None:
    """A visibility mask padded with False (visible) up to `length` positions."""
    if hidden_keys is None:
        return None
    mask = np.zeros(length, dtype=bool)
    n = min(length, len(hidden_keys))
    mask[:n] = hidden_keys[:n]
    return torch.from_numpy(mask)


def _stack(steps: list[StepView]) -> dict[str, np.ndarray]:
    if not steps:
        return {"token_id": np.zeros(0, np.int64)}
    out = {name: np.stack([s.arrays[name] for s in steps]) for name in steps[0].arrays}
    for name in list(out):
        if name.endswith("_pos") or name == "top1_token":
            out[name] = out[name].astype(np.int32 if name.endswith("_pos") else np.int64)
        else:
            out[name] = out[name].astype(np.float32)
    out["token_id"] = np.array([s.token_id for s in steps], dtype=np.int64)
    out["token_entropy"] = np.array([s.entropy for s in steps], dtype=np.float32)
    out["token_logprob"] = np.array([s.logprob for s in steps], dtype=np.float32)
    if steps[0].hidden is not None:
        out["hidden"] = np.stack([s.hidden for s in steps]).astype(np.float32)
    return out


def trace_generation(model, tokenizer, prompt: str | list[int], needle: str | None = None,
                     needle_span: tuple[int, int] | None = None, chat: bool = True,
                     config: TraceConfig = TraceConfig()) -> tuple[Trace, dict[str, np.ndarray]]:
    """One-call tracing for Python users: any HF causal LM + tokenizer, a prompt, and the needle.

    `prompt` is a user message (wrapped in the chat template when `chat` and the tokenizer has one)
    or token ids. The needle is given as a substring of the prompt (`needle`, located exactly from
    character offsets) or as a token range (`needle_span`). Returns the trace and its record arrays,
    including the Eq. 1 `score` [T, layers, heads].
    """
    from dynheads.heads import HeadLayout
    from dynheads.scores.copy_paste import copy_paste_score
    from dynheads.tasks.base import PromptFormat, Sample, encode

    lm = LoadedModel(model.eval(), tokenizer, HeadLayout.from_config(model.config), "python", "", "")
    spans: dict[str, list[tuple[int, int]]] = {}
    if isinstance(prompt, str):
        fmt = PromptFormat(None, "{context}") if chat else None
        if fmt is not None and getattr(tokenizer, "chat_template", None):
            at = prompt.find(needle) if needle else -1
            sample = Sample("prompt", prompt, "", "", {"needle": [(at, at + len(needle))]} if at >= 0 else {}, fmt)
            enc = encode(sample, tokenizer)
            ids, spans = enc.input_ids, enc.token_spans
        else:
            enc = tokenizer(prompt, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            if needle and needle in prompt:
                cs = prompt.index(needle)
                toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < cs + len(needle) and b > cs and b > a]
                spans = {"needle": [(toks[0], toks[-1] + 1)]}
    else:
        ids = list(prompt)
    if needle_span is not None:
        spans = {"needle": [tuple(needle_span)]}
    if needle and "needle" not in spans:
        from dynheads.errors import DataError

        raise DataError("the needle is not a substring of the prompt")
    tracer = Tracer(lm, config)
    trace = tracer.generate(tracer.prefill(ids, spans), fork=False)
    arrays = trace.arrays()
    if "needle" in spans and len(arrays["token_id"]):
        arrays["score"] = copy_paste_score(arrays, spans)
    return trace, arrays


def _noting(decide, decided: dict[int, np.ndarray]):
    """`decide` that also notes each layer's choice in `decided` (the step's open units, for the trace)."""

    def noted(layer: int, seen) -> np.ndarray:
        decided[layer] = np.asarray(decide(layer, seen), bool)
        return decided[layer]

    return noted
