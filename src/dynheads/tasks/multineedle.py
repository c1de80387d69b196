"""Multi-needle NIAH (RULER-style, Hsieh et al. 2024): N key–value needles in one haystack.

`multikey` (RULER MK): N needles with distinct keys, "The magic word for {key} is {value}."; the
question asks for needle_0's value and the other N − 1 needles are distractors.
`multivalue` (RULER MV): N needles share one key, "One of the magic words for {key} is {value}.";
the question asks for all N values. Keys are words of a fixed list, values are seeded UUIDs; with a
needle file (`--needles`), N distinct rows of the file are used as they are (multikey asks the first
one's question, multivalue all their questions).

Depths (our choice; RULER draws them at random): the grid cell's depth d is needle_0's depth and
needle i sits at (d + 100·i/N) mod 100, so the needles are spread evenly around the haystack and
the accuracy-by-depth grid keeps its meaning for the queried needle. Each depth is moved back to a
sentence end of the haystack (`niah.sentence_start`); needles snapped to the same point follow
each other in index order.

Spans: `needle_0` … `needle_{N-1}` (each needle sentence), `value_0` … `value_{N-1}` (each needle's
value), `needle` = the queried needle(s) (needle_0 for multikey, all for multivalue; Eq. 1 scores
against it), `answer` = the queried values.
Prompt length: exactly the grid's length where a haystack cut allows it, else the longest prompt below it
(a longer cut can move a needle to a later sentence end; `prompt_tokens` holds the count).
Accuracy: multikey, the queried value appears in the response; multivalue, the fraction of the N
values that appear (each counted once, case-insensitive).
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Iterator

from dynheads.errors import ConfigError
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample
from dynheads.tasks.metrics import contains_accuracy, rouge_l
from dynheads.tasks.niah import NIAH_PROMPT, Needle, NiahConfig, _overhead, fit_length, sentence_start

MODES = ("multikey", "multivalue")
KEY_NEEDLE = "The magic word for {key} is {value}."
KEY_QUESTION = "What is the magic word for {key}?"
VALUE_NEEDLE = "One of the magic words for {key} is {value}."
VALUE_QUESTION = "What are all the magic words for {key}?"
KEYS = ("apricot", "badger", "cactus", "dolphin", "emerald", "falcon", "giraffe", "hazelnut", "iguana",
        "jasmine", "kangaroo", "lobster", "mango", "nightingale", "octopus", "pelican", "quartz", "raccoon",
        "saffron", "tangerine", "umbrella", "violet", "walrus", "yak", "zucchini", "beetroot", "coyote",
        "dragonfly", "eucalyptus", "flamingo", "gooseberry", "hedgehog")


@dataclass(frozen=True)
class MultiNiahConfig(NiahConfig):
    """The NIAH grid with N ≥ 2 needles per prompt (a separate class: single-needle configs are unchanged)."""

    num_needles: int = 2  # needles per prompt (RULER uses 1–8)
    mode: str = "multikey"  # "multikey": one key asked, others distract; "multivalue": all values asked


@dataclass(frozen=True)
class NeedleSet:
    """The needles of one prompt, their depths (%), the question and which needles it asks for."""

    needles: tuple[Needle, ...]
    depths: tuple[float, ...]
    question: str
    queried: tuple[int, ...]


def niah_config(num_needles: int = 1, mode: str | None = None, **grid) -> NiahConfig:
    """NiahConfig for one needle (mode must be unset), MultiNiahConfig for several."""
    if num_needles < 1:
        raise ConfigError(f"--num-needles must be at least 1, got {num_needles}")
    if num_needles == 1:
        if mode is not None:
            raise ConfigError("--mode needs --num-needles of 2 or more")
        return NiahConfig(**grid)
    return MultiNiahConfig(**grid, num_needles=num_needles, mode=mode or "multikey")


def needle_depths(depth: float, n: int) -> tuple[float, ...]:
    """Depth of each needle: needle_0 at `depth`, needle i at (depth + 100·i/n) mod 100."""
    return (float(depth),) + tuple((depth + 100 * i / n) % 100 for i in range(1, n))


def make_needle_set(config: MultiNiahConfig, depth: float, rng: random.Random,
                    needle_file: list[Needle] | None, rep: int) -> NeedleSet:
    """The needles of one sample: seeded keys and UUID values, or N consecutive rows of the needle file."""
    n, depths = config.num_needles, needle_depths(depth, config.num_needles)
    queried = (0,) if config.mode == "multikey" else tuple(range(n))
    if needle_file:
        needles = tuple(needle_file[(rep * n + i) % len(needle_file)] for i in range(n))
        question = " ".join(needles[i].question for i in queried)
        return NeedleSet(needles, depths, question, queried)
    values = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
    if config.mode == "multikey":
        keys = rng.sample(KEYS, n)
        needles = tuple(Needle(KEY_NEEDLE.format(key=k, value=v), "", v) for k, v in zip(keys, values))
        return NeedleSet(needles, depths, KEY_QUESTION.format(key=keys[0]), queried)
    key = rng.choice(KEYS)
    needles = tuple(Needle(VALUE_NEEDLE.format(key=key, value=v), "", v) for v in values)
    return NeedleSet(needles, depths, VALUE_QUESTION.format(key=key), queried)


def insert_needles(text: str, needles: list[str], depths: list[float]) -> tuple[str, list[int]]:
    """Insert each needle at its depth (sentence-snapped, see module docstring); returns (text, starts)."""
    points = [sentence_start(text, d) for d in depths]
    out, starts, prev = "", [0] * len(needles), 0
    for i in sorted(range(len(needles)), key=lambda i: (points[i], i)):
        out = _join(_join(out, text[prev:points[i]]), needles[i])
        starts[i], prev = len(out) - len(needles[i]), points[i]
    return _join(out, text[prev:]), starts


def multi_needle_samples(tokenizer, config: MultiNiahConfig, hay, needle_file: list[Needle] | None,
                         prompt: PromptFormat = NIAH_PROMPT) -> Iterator[EncodedSample]:
    """Encoded multi-needle samples in the grid order (length, depth, repeat); ids niah{N}mk-… / niah{N}mv-…"""
    _check(config, needle_file)
    tag = f"niah{config.num_needles}{'mk' if config.mode == 'multikey' else 'mv'}"
    for length in config.lengths:
        for depth in config.depths:
            for rep in range(config.samples_per_cell):
                sid = f"{tag}-{length}-{depth:g}-{rep}"
                needles = make_needle_set(config, depth, random.Random(f"{config.seed}:{sid}"), needle_file, rep)
                yield build_multi_sample(tokenizer, hay, needles, length, depth, sid, config.mode, prompt)


def build_multi_sample(tokenizer, hay, needles: NeedleSet, length: int, depth: float, sample_id: str,
                       mode: str, prompt: PromptFormat = NIAH_PROMPT) -> EncodedSample:
    """One prompt of exactly `length` tokens holding every needle of `needles` (spans: module docstring)."""
    texts = [n.text for n in needles.needles]
    values = [needles.needles[i].answer for i in needles.queried]

    def make(haystack: str) -> Sample:
        context, starts = insert_needles(haystack, texts, list(needles.depths))
        each = {f"needle_{i}": [(s, s + len(t))] for i, (s, t) in enumerate(zip(starts, texts))}
        value = {f"value_{i}": [(starts[i] + n.answer_offset, starts[i] + n.answer_offset + len(n.answer))]
                 for i, n in enumerate(needles.needles)}
        return Sample(
            id=sample_id, context=context, question=needles.question,
            answer=values[0] if mode == "multikey" else values,
            spans={"needle": [each[f"needle_{i}"][0] for i in needles.queried],
                   "answer": [value[f"value_{i}"][0] for i in needles.queried], **each, **value},
            prompt=prompt,
            metadata={"length": length, "depth": depth, "needle": texts[needles.queried[0]], "mode": mode,
                      "needles": texts, "depths": list(needles.depths), "values": [n.answer for n in needles.needles],
                      "queried": list(needles.queried)},
        )

    return fit_length(tokenizer, hay, length, _overhead(tokenizer, " ".join(texts), needles.question, prompt), make,
                      search=8)


def score_multi_response(response: str, sample: Sample) -> dict:
    """accuracy (multikey: queried value found; multivalue: fraction of values found), ROUGE-L, per-needle recall."""
    values, queried = sample.metadata["values"], sample.metadata["queried"]
    found = [contains_accuracy(response, v) for v in values]
    accuracy = sum(found[i] for i in queried) / len(queried)
    reference = " ".join(values[i] for i in queried)
    return {"accuracy": accuracy, "rouge_l": rouge_l(response, reference), "needle_found": found}


def check_multi_needle(config: MultiNiahConfig) -> None:
    """The multi-needle options against the key list or the needle file (no model needed); ConfigError if bad."""
    from dynheads.tasks.niah import load_needles

    _check(config, load_needles(config.needles) if config.needles else None)


def _check(config: MultiNiahConfig, needle_file: list[Needle] | None) -> None:
    if config.mode not in MODES:
        raise ConfigError(f"unknown --mode '{config.mode}'; choose one of: {', '.join(MODES)}")
    if config.num_needles < 2:
        raise ConfigError(f"a multi-needle grid needs at least 2 needles, got {config.num_needles}")
    limit = len(needle_file) if needle_file else len(KEYS)
    if config.num_needles > limit:
        raise ConfigError(f"--num-needles {config.num_needles} is more than the {limit} distinct "
                          f"{'needles in the needle file' if needle_file else 'keys available'}")
    if needle_file and len({n.answer.lower() for n in needle_file}) < len(needle_file):
        raise ConfigError("a multi-needle grid needs needles with distinct answers (real_needle)")


def _join(a: str, b: str) -> str:
    """a + b with one space between them unless either side already has whitespace there (as insert_needle)."""
    return a + ("" if not a or not b or a[-1].isspace() or b[0].isspace() else " ") + b
