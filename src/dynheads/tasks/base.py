"""Samples (model-independent) and their encoding into one tokenised prompt.

A task yields `Sample`s whose `spans` are character ranges inside `context`. `encode()` renders
the prompt (the chat template, or plain text for base models), tokenises once with offsets, and
maps every character span to the exact token range that covers it, so no fuzzy needle search is
ever needed.

Prompt styles (`--prompt-style`): `chat` renders the task's system and user messages with the
tokenizer's chat template and encodes that text as it is (the template writes its own special
tokens); `completion` is the base-model format of Wu et al.'s NIAH harness — the context, the
question and an answer cue, no instruction after the question — encoded with the tokenizer's own
special-token rule (a `<bos>` where the tokenizer adds one). `auto` picks `chat` when the tokenizer
has a chat template and `completion` otherwise; a run stores the resolved style.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from dynheads.errors import ConfigError, DataError, ModelError
from dynheads.registry import Registry

CharSpan = tuple[int, int]  # [start, end) in characters of Sample.context
TokenSpan = tuple[int, int]  # [start, end) in tokens of EncodedSample.input_ids


PROMPT_STYLES = ("auto", "chat", "completion")


@dataclass(frozen=True)
class PromptFormat:
    """How a task turns context and question into a prompt; `user` holds {context} and {question}.

    style "chat": `system` and `user` are chat messages for the tokenizer's template; "completion":
    the plain text `system + "\n\n" + user` (system usually None), for models without a template.
    """

    system: str | None
    user: str
    style: str = "chat"


def check_prompt_style(style: str) -> None:
    """A one-line ConfigError for a style name that does not exist (no model needed)."""
    if style not in PROMPT_STYLES:
        raise ConfigError(f"unknown --prompt-style '{style}'; choose one of: {', '.join(PROMPT_STYLES)}")


def resolve_prompt_style(tokenizer, style: str = "auto") -> str:
    """`chat` or `completion` for this tokenizer: auto → chat when it has a chat template."""
    check_prompt_style(style)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "chat" if has_template else "completion"
    if style == "chat" and not has_template:
        raise ConfigError("--prompt-style chat: the model's tokenizer has no chat template (a base model?); "
                          "use --prompt-style completion or auto")
    return style


@dataclass
class Sample:
    """One task instance before tokenisation; `spans` maps a name to character ranges in `context`."""

    id: str
    context: str
    question: str
    answer: str | list[str]
    spans: dict[str, list[CharSpan]]
    prompt: PromptFormat
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["spans"] = {k: [list(s) for s in v] for k, v in self.spans.items()}
        return d

    @property
    def answers(self) -> list[str]:
        return [self.answer] if isinstance(self.answer, str) else list(self.answer)


@dataclass
class EncodedSample:
    """A sample after the model's chat template and tokenizer; spans are exact token ranges."""

    sample: Sample
    input_ids: list[int]
    token_spans: dict[str, list[TokenSpan]]
    context_tokens: TokenSpan
    prompt_text: str

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    def span_positions(self, name: str) -> list[int]:
        """All token positions of a named span, sorted."""
        return [p for s, e in self.token_spans[name] for p in range(s, e)]


def render_prompt(tokenizer, fmt: PromptFormat, context: str, question: str) -> tuple[str, int]:
    """Rendered prompt text and the character offset where `context` starts in it."""
    before, sep, after = fmt.user.partition("{context}")
    if not sep:
        raise DataError("prompt format has no {context} placeholder")
    prefix = before.format(question=question)
    user = prefix + context + after.format(question=question)
    messages = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [
        {"role": "user", "content": user}
    ]
    if fmt.style == "completion":
        text = (fmt.system + "\n\n" if fmt.system else "") + user
    elif getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        raise ConfigError("a chat-style prompt needs a tokenizer with a chat template; use the completion style "
                          "(--prompt-style completion or auto)")
    user_at = text.find(user)
    if user_at < 0:
        raise ModelError("the chat template rewrote the user message; cannot locate the context")
    return text, user_at + len(prefix)


def encode(sample: Sample, tokenizer) -> EncodedSample:
    """Tokenise `sample` with the model's template; raise DataError if a span does not survive."""
    text, ctx_at = render_prompt(tokenizer, sample.prompt, sample.context, sample.question)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("dynheads needs a fast tokenizer (character offsets) to locate spans exactly")
    enc = tokenize_prompt(tokenizer, text, sample.prompt.style)
    offsets = enc["offset_mapping"]
    token_spans = {
        name: _char_to_token_spans(offsets, [(s + ctx_at, e + ctx_at) for s, e in ranges], sample.id, name)
        for name, ranges in sample.spans.items()
    }
    (ctx_span,) = _char_to_token_spans(offsets, [(ctx_at, ctx_at + len(sample.context))], sample.id, "context")
    return EncodedSample(sample, list(enc["input_ids"]), token_spans, ctx_span, text)


def tokenize_prompt(tokenizer, text: str, style: str):
    """Token ids and character offsets of a rendered prompt: chat text exactly as the template wrote it
    (its special tokens are in the text), completion text with the tokenizer's own special-token rule.
    Special tokens get empty offsets, so they never fall inside a span."""
    return tokenizer(text, add_special_tokens=style == "completion", return_offsets_mapping=True)


def _char_to_token_spans(offsets, ranges: list[CharSpan], sample_id: str, name: str) -> list[TokenSpan]:
    """Token ranges covering each character range (tokens that overlap it), merged when adjacent."""
    out: list[TokenSpan] = []
    for cs, ce in sorted(ranges):
        toks = [i for i, (a, b) in enumerate(offsets) if a < ce and b > cs and b > a]
        if not toks or ce <= cs:
            raise DataError(f"sample {sample_id}: span '{name}' not found after tokenisation")
        s, e = toks[0], toks[-1] + 1
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@dataclass(frozen=True)
class Task:
    """A registered task: how its samples are built and checked, and what scores its heads and answers."""

    name: str
    samples: Callable[..., Iterable[EncodedSample]]  # (tokenizer, config, max_positions) → samples in a fixed order
    config: type  # the frozen config dataclass a run stores as `task`
    score: str  # its head score (scores/; `--score` overrides)
    span: str  # the named span that score reads (the needle, the supporting facts)
    metric: Callable[[str, Sample], dict]  # answer metrics of one response
    check: Callable[[Any], None]  # model-free validation of a config (grid, input files), before any model loads
    inputs: Callable[[Any], tuple[Any, dict]]  # the config with input paths resolved, and their content fingerprints


tasks: Registry[Task] = Registry("task")


def task(name: str, *, config: type, score: str, span: str, metric: Callable, check: Callable, inputs: Callable):
    """Register `samples(tokenizer, config, max_positions)` as the task `name` with its score, span and metric."""

    def deco(samples: Callable[..., Iterable[EncodedSample]]):
        tasks.register(name)(Task(name, samples, config, score, span, metric, check, inputs))
        return samples

    return deco


def get_task(name: str) -> Task:
    """A registered task (the built-ins register at import; none of them imports torch)."""
    import dynheads.tasks.multihop  # noqa: F401
    import dynheads.tasks.niah  # noqa: F401

    return tasks.get(name)


def encode_stored(row: dict[str, Any], tokenizer) -> EncodedSample:
    """Re-encode a run's stored sample (samples/<id>.json) with the run's tokenizer; it must give the stored
    length and spans (another tokenizer is refused with one line)."""
    from dynheads.errors import DataError

    s = dict(row["sample"])
    s["prompt"] = PromptFormat(**s["prompt"])
    s["spans"] = {k: [tuple(x) for x in v] for k, v in s["spans"].items()}
    enc = encode(Sample(**s), tokenizer)
    stored = {k: [list(x) for x in v] for k, v in row["token_spans"].items()}
    if enc.prompt_len != row["prompt_tokens"] or {k: [list(x) for x in v] for k, v in enc.token_spans.items()} != stored:
        raise DataError(f"sample {row['id']}: re-encoding the prompt gives {enc.prompt_len} tokens, the run stored "
                        f"{row['prompt_tokens']} (another tokenizer?)")
    return enc
