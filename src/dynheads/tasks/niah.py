"""Needle-in-a-Haystack (paper App. A.1): a UUID needle in a haystack cut to an exact prompt length.

The haystack is any folder of `.txt` files (or one file); the embedded default is the English
prose of CPython's own documentation data (`pydoc_data.topics`), so the default run needs no
external files. The needle goes at the requested depth, moved back to the nearest sentence end,
and its token span is located exactly from the tokenizer's character offsets.
"""
from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from dynheads.errors import ConfigError, DataError
from dynheads.files import fingerprint, resolved
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample, encode, resolve_prompt_style, task
from dynheads.tasks.metrics import contains_accuracy, rouge_l

NIAH_PROMPT = PromptFormat(  # the paper's chat prompt (App. A.1)
    system="You are a helpful AI bot that answers questions for a user. Keep your response short and direct.",
    user="Context: {context}\n\nQuestion: {question}\n\n"
    "Instruction: Answer the question using the context. Don't give information outside the document "
    "or repeat your findings.",
)
# Base models (Wu et al.'s harness): the context, the question and an answer cue; nothing after the cue.
NIAH_COMPLETION = PromptFormat(None, "{context}\n\nQuestion: {question}\nAnswer:", style="completion")
NIAH_PROMPTS = {"chat": NIAH_PROMPT, "completion": NIAH_COMPLETION}
UUID_NEEDLE = "The magic word is {answer}."
UUID_QUESTION = "What is the magic word?"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(\s|$)")
_NOT_TEXT = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # undecodable bytes, control characters


@dataclass(frozen=True)
class Needle:
    """A needle sentence, its question, and the answer span inside it (Retrieval_Head's real_needle)."""

    text: str
    question: str
    answer: str

    @property
    def answer_offset(self) -> int:
        """Where the answer starts in the needle (case-insensitive, as in Wu et al.'s third needle)."""
        return self.text.lower().index(self.answer.lower())


@dataclass(frozen=True)
class NiahConfig:
    """The NIAH grid: prompt lengths (tokens, whole prompt) × depths (%) × samples per cell."""

    lengths: tuple[int, ...] = (1000, 2000, 4000)
    depths: tuple[float, ...] = (0, 25, 50, 75, 100)
    samples_per_cell: int = 2
    haystack: str | None = None  # folder or .txt file; None = CPython documentation prose (embedded)
    needles: str | None = None  # JSONL with needle/question/real_needle; None = fresh seeded UUID per sample
    seed: int = 0
    prompt_style: str = "auto"  # auto | chat | completion (tasks/base.py); runs store the resolved style


def niah_samples(tokenizer, config: NiahConfig, max_positions: int | None = None) -> Iterator[EncodedSample]:
    """Encoded samples of the grid, in a fixed order (length, depth, repeat)."""
    if not config.lengths or not config.depths or config.samples_per_cell < 1:
        raise ConfigError("the NIAH grid is empty (need lengths, depths and samples-per-cell ≥ 1)")
    for length in config.lengths:
        if max_positions and length > max_positions:
            raise ConfigError(f"context length {length} is above the model's maximum of {max_positions} tokens")
    for depth in config.depths:
        if not 0 <= depth <= 100:
            raise ConfigError(f"depth {depth} is outside 0–100")
    prompt = NIAH_PROMPTS[resolve_prompt_style(tokenizer, config.prompt_style)]
    haystack = load_haystack(config.haystack)
    needle_file = load_needles(config.needles) if config.needles else None
    hay_ids = _HaystackTokens(tokenizer, haystack, max(config.lengths))
    if getattr(config, "num_needles", 1) > 1:  # RULER-style multi-needle grid (tasks/multineedle.py)
        from dynheads.tasks.multineedle import multi_needle_samples

        yield from multi_needle_samples(tokenizer, config, hay_ids, needle_file, prompt)
        return
    for length in config.lengths:
        for depth in config.depths:
            for rep in range(config.samples_per_cell):
                sid = f"niah-{length}-{depth:g}-{rep}"
                rng = random.Random(f"{config.seed}:{sid}")
                if needle_file:
                    needle = needle_file[rep % len(needle_file)]
                else:
                    answer = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                    needle = Needle(UUID_NEEDLE.format(answer=answer), UUID_QUESTION, answer)
                yield build_sample(tokenizer, hay_ids, needle, length, depth, sid, prompt)


def build_sample(tokenizer, hay: "_HaystackTokens", needle: Needle, length: int, depth: float,
                 sample_id: str, prompt: PromptFormat = NIAH_PROMPT) -> EncodedSample:
    """Cut the haystack so the whole prompt has `length` tokens and insert the needle at `depth`%."""

    def make(haystack: str) -> Sample:
        context, needle_at = insert_needle(haystack, needle.text, depth)
        answer_at = needle_at + needle.answer_offset
        return Sample(
            id=sample_id, context=context, question=needle.question, answer=needle.answer,
            spans={"needle": [(needle_at, needle_at + len(needle.text))],
                   "answer": [(answer_at, answer_at + len(needle.answer))]},
            prompt=prompt,
            metadata={"length": length, "depth": depth, "needle": needle.text},
        )

    return fit_length(tokenizer, hay, length, _overhead(tokenizer, needle.text, needle.question, prompt), make)


def fit_length(tokenizer, hay: "_HaystackTokens", length: int, overhead: int,
               make: Callable[[str], Sample], search: int = 0) -> EncodedSample:
    """Encode `make(haystack prefix)` with the prefix sized so the whole prompt has `length` tokens.

    When four corrections do not land on `length` (a longer prefix can move a needle to a later
    sentence end), `search` > 0 tries the prefixes within ±search tokens: an exact one, else the
    longest prompt below `length`. The count reached is stored as metadata["prompt_tokens"].
    """
    budget = length - overhead
    for _ in range(4):  # re-tokenisation at the seams can shift the count by a few tokens
        if budget <= 0:
            raise ConfigError(f"context length {length} is too short for the prompt and needle")
        encoded = encode(make(hay.prefix(budget)), tokenizer)
        if encoded.prompt_len == length:
            break
        budget += length - encoded.prompt_len
    if encoded.prompt_len != length and search:
        near = [encode(make(hay.prefix(b)), tokenizer) for b in range(max(budget - search, 1), budget + search + 1)]
        fits = sorted((e for e in near if e.prompt_len <= length), key=lambda e: e.prompt_len)
        encoded = fits[-1] if fits else encoded
    encoded.sample.metadata["prompt_tokens"] = encoded.prompt_len
    return encoded


def insert_needle(text: str, needle: str, depth: float) -> tuple[str, int]:
    """Insert `needle` at `depth`% of `text`, moved back to the nearest sentence end; returns (text, start)."""
    at = sentence_start(text, depth)
    before, after = text[:at], text[at:]
    sep_before = "" if not before or before[-1].isspace() else " "
    sep_after = "" if not after or after[0].isspace() else " "
    start = len(before) + len(sep_before)
    return before + sep_before + needle + sep_after + after, start


def sentence_start(text: str, depth: float) -> int:
    """Character offset of `depth`% of `text`, moved back to the last sentence end before it (0 if none)."""
    target = round(len(text) * depth / 100)
    at = 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > target:
            break
        at = m.end()
    return at


def score_response(response: str, sample: Sample) -> dict[str, float]:
    """NIAH metrics: accuracy (the full answer appears) and ROUGE-L against the answer."""
    if "queried" in sample.metadata:  # a multi-needle sample: per-needle recall (tasks/multineedle.py)
        from dynheads.tasks.multineedle import score_multi_response

        return score_multi_response(response, sample)
    return {"accuracy": contains_accuracy(response, sample.answer), "rouge_l": rouge_l(response, sample.answer)}


def load_haystack(path: str | None) -> str:
    """Haystack text from a folder of .txt files (sorted), one file, or the embedded default."""
    if path is None:
        return _cpython_doc_prose()
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        text = "\n\n".join(_text_file(f).strip() for f in files)
    elif p.is_file():
        text = _text_file(p)
    else:
        raise DataError(f"haystack {p} does not exist")
    if len(text.split()) < 50:
        raise DataError(f"haystack {p} holds no usable text (need .txt files with prose)")
    return text


def _text_file(path: Path) -> str:
    """A haystack file's text; refuses binary data (a prompt of random bytes would measure nothing)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    bad = len(_NOT_TEXT.findall(text))
    if bad > 0.01 * len(text):
        raise DataError(f"haystack file {path} is not UTF-8 text ({bad / len(text):.0%} of its characters are "
                        "undecodable or control characters)")
    return text


def load_needles(path: str) -> list[Needle]:
    """Retrieval_Head-style needle file: JSONL lines with needle, question and real_needle (or answer)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"needle file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"needle file {p} is not UTF-8 text") from None
    needles = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, question = row["needle"].strip(), row["question"].strip()
            answer = (row.get("real_needle") or row.get("answer") or "").strip()
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise DataError(f"needle file {p} line {i}: expected JSON with needle, question, real_needle") from None
        if not answer or answer.lower() not in text.lower():
            raise DataError(f"needle file {p} line {i}: real_needle is not a part of the needle sentence")
        needles.append(Needle(text, question, answer))
    if not needles:
        raise DataError(f"needle file {p} has no needles")
    return needles


class _HaystackTokens:
    """The haystack repeated to cover the longest prompt, tokenised once with character offsets."""

    def __init__(self, tokenizer, text: str, max_tokens: int):
        text = text.strip()
        reps = 1
        while True:
            full = "\n\n".join([text] * reps)
            offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) >= max_tokens:
                break
            reps = reps * 2 if len(offsets) else reps + 1
        self.text, self.offsets = full, offsets

    def prefix(self, n_tokens: int) -> str:
        n = max(1, min(n_tokens, len(self.offsets)))
        return self.text[: self.offsets[n - 1][1]]


def _overhead(tokenizer, needle_text: str, question: str, prompt: PromptFormat = NIAH_PROMPT) -> int:
    """Tokens of the prompt without haystack: template, question and needle text."""
    s = Sample("probe", needle_text, question, "", {}, prompt)
    return encode(s, tokenizer).prompt_len


def _cpython_doc_prose() -> str:
    """English prose paragraphs of CPython's bundled documentation topics (stdlib pydoc_data)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            if block.startswith((" ", "\t", "*", "=", "-")) or ">>>" in block:
                continue  # code, headings and lists: keep flowing prose only
            para = " ".join(block.split())
            if len(para) > 200 and para.count(".") >= 2:
                paragraphs.append(para)
    return "\n\n".join(paragraphs)


def check_grid(niah: NiahConfig) -> None:
    """Everything about a NIAH grid that needs no model: the grid, the haystack and needle files, several needles."""
    if not niah.lengths or not niah.depths or niah.samples_per_cell < 1:
        raise ConfigError("the NIAH grid is empty (need lengths, depths and samples-per-cell >= 1)")
    bad = [d for d in niah.depths if not 0 <= d <= 100]
    if bad:
        raise ConfigError(f"depth {bad[0]:g} is outside 0-100")
    if min(niah.lengths) < 1:
        raise ConfigError(f"context length {min(niah.lengths)} must be positive")
    if niah.haystack is not None:
        load_haystack(niah.haystack)
    if niah.needles is not None:
        load_needles(niah.needles)
    if getattr(niah, "num_needles", 1) > 1:
        from dynheads.tasks.multineedle import check_multi_needle

        check_multi_needle(niah)


def niah_inputs(niah: NiahConfig) -> tuple[NiahConfig, dict]:
    """The grid with its haystack and needle paths resolved, and their content fingerprints: a resumed
    run compares both, so another folder behind the same relative path is refused, and the same folder
    written as an absolute path resumes."""
    niah = replace(niah, haystack=resolved(niah.haystack), needles=resolved(niah.needles))
    return niah, {"haystack": niah.haystack and fingerprint(niah.haystack, "*.txt"),
                  "needles": niah.needles and fingerprint(niah.needles)}


@task("niah", config=NiahConfig, score="copy_paste", span="needle", metric=score_response, check=check_grid,
      inputs=niah_inputs)
def niah_task(tokenizer, config: NiahConfig = NiahConfig(), max_positions: int | None = None):
    """The NIAH grid's samples (several needles when the config is a MultiNiahConfig); Eq. 1 on the needle."""
    return niah_samples(tokenizer, config, max_positions)
