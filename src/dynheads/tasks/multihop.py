"""Multi-hop QA task (HotpotQA, 2WikiMultihopQA, IRCoT, MuSiQue files) with supporting facts as spans.

Paper Sec. 4: the supporting-fact tokens are the "needles" of the Eq. 2 reasoning retrieval score.

Context string (our choice; the paper does not show its prompt): one block per paragraph,
`"Title: <title>\\n<text>"`, blocks separated by one blank line (`"\\n\\n"`). `<text>` is the
paragraph's sentences concatenated, with one space inserted only where neither side already has
whitespace (HotpotQA sentences carry their own leading space, so its text is the original paragraph).
Span "support" = every supporting-fact sentence, whitespace-stripped (sentence-level files), or the
text of every supporting paragraph without its title line (IRCoT, MuSiQue: paragraph-level support).
`metadata["paragraphs"]` lists, per paragraph, `{title, start, end, text_start, is_supporting,
sentences: [[start, end], ...]}` in context characters (IRCoT/MuSiQue: one "sentence" = the text).
A supporting fact resolves to the first paragraph with its title (2Wiki repeats a few titles).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from dynheads.errors import ConfigError, DataError
from dynheads.files import fingerprint, resolved
from dynheads.registry import Registry
from dynheads.tasks.base import CharSpan, EncodedSample, PromptFormat, Sample, check_prompt_style, encode, task

SYSTEM = "You are a helpful assistant that answers questions using the given documents. Keep your response short and direct."
# Base models (completion style): a worked example of the "cot" answer form, on invented documents (no
# dataset text), before the real context; chat models get the same instruction in their user message.
FEW_SHOT = (
    "Answer each question from the documents by reasoning step by step in a few short sentences, then finish "
    "with \"So the answer is <short answer>.\"\n\n"
    "Title: Marla Quinn\nMarla Quinn is a Canadian sculptor who was born in Halifax in 1961.\n\n"
    "Title: Halifax\nHalifax is the capital of the province of Nova Scotia.\n\n"
    "Question: In which province was the sculptor Marla Quinn born?\n"
    "Answer: Marla Quinn was born in Halifax. Halifax is in Nova Scotia. So the answer is Nova Scotia.\n\n"
    "Title: Red Lantern Cafe\nThe Red Lantern Cafe opened in Leeds in 1994.\n\n"
    "Title: Blue Door Bakery\nThe Blue Door Bakery opened in York in 1987.\n\n"
    "Question: Did the Red Lantern Cafe open before the Blue Door Bakery?\n"
    "Answer: The Red Lantern Cafe opened in 1994. The Blue Door Bakery opened in 1987. 1994 is after 1987. "
    "So the answer is no.\n\n"
)
COMPLETION_USER = "{context}\n\nQuestion: {question}\nAnswer:"
# "short": the answer alone (Fig. 6/7 EM/F1 on the first line). "cot": DRAGIN-style reasoning that ends
# in "So the answer is ...", for the Dynamic RAG loop (RIND needs drafted sentences). Each in both styles.
PROMPTS: dict[str, dict[str, PromptFormat]] = {
    "short": {
        "chat": PromptFormat(
            SYSTEM,
            "Context:\n{context}\n\nQuestion: {question}\n\n"
            "Instruction: Answer the question using the context. Reply with the short answer only "
            "(a name, date, number, or yes/no), without explanation.",
        ),
        "completion": PromptFormat(None, COMPLETION_USER, style="completion"),
    },
    "cot": {
        "chat": PromptFormat(
            SYSTEM,
            "Context:\n{context}\n\nQuestion: {question}\n\n"
            "Instruction: Answer the question using the context. Reason step by step in a few short "
            "sentences, then finish with \"So the answer is <short answer>.\"",
        ),
        "completion": PromptFormat(None, FEW_SHOT + COMPLETION_USER, style="completion"),
    },
}
PARAGRAPH_SEP = "\n\n"
TITLE_PREFIX = "Title: "


@dataclass(frozen=True)
class Paragraph:
    """One context paragraph as read from a file (IRCoT/MuSiQue: one "sentence", the paragraph text)."""

    title: str
    sentences: tuple[str, ...]
    supporting: bool = False  # paragraph-level flag (IRCoT, MuSiQue)


@dataclass(frozen=True)
class RawRecord:
    """A record in a layout-independent form, before the context string is built."""

    id: str
    question: str
    answers: tuple[str, ...]
    paragraphs: tuple[Paragraph, ...]
    facts: tuple[tuple[str, int], ...] | None  # sentence-level supporting facts, None = paragraph-level
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What a load kept and what it skipped (records whose supporting facts are absent from their context)."""

    path: str
    format: str
    n_records: int = 0  # records read
    n_loaded: int = 0
    n_missing_support: int = 0  # records with at least one supporting fact not in their context
    skipped_ids: list[str] = field(default_factory=list)


@dataclass
class MultihopTask:
    """The samples of one file plus the load report; iterates as the samples."""

    samples: list[Sample]
    report: LoadReport

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def multihop(path: str, limit: int | None = None, format: str = "auto", prompt: str = "short",
             keep_missing_support: bool = False, prompt_style: str = "chat") -> MultihopTask:
    """HotpotQA-style multi-hop QA from a file; `format` is auto or one of `formats.names()`."""
    samples, report = load_multihop(path, limit, format, prompt, keep_missing_support, prompt_style)
    return MultihopTask(samples, report)


@dataclass(frozen=True)
class MultihopConfig:
    """Which multi-hop file and how to prompt it (stored in the run config)."""

    data: str
    limit: int | None = None  # samples kept (records skipped for missing support do not count)
    format: str = "auto"  # a layout of tasks.multihop.formats, or auto-detect from the first record
    prompt: str = "short"  # tasks.multihop.PROMPTS: "short" answers (Fig. 6 EM/F1) or "cot" (as Dynamic RAG)
    prompt_style: str = "auto"  # auto | chat | completion (tasks/base.py); runs store the resolved style


def score_answer(response: str, sample: Sample) -> dict[str, Any]:
    """EM/F1 of the short answer inside a response (`accuracy` = EM, for code written for NIAH)."""
    from dynheads.tasks.metrics import exact_match, extract_answer, f1_score

    pred = extract_answer(response)
    em = exact_match(pred, sample.answers)
    return {"prediction": pred, "em": em, "f1": f1_score(pred, sample.answers), "accuracy": em}


def multihop_inputs(config: MultihopConfig) -> tuple[MultihopConfig, dict]:
    """The config with its data path resolved, and the file's content fingerprint (a resumed run compares it)."""
    config = replace(config, data=resolved(config.data))
    return config, {"data": fingerprint(config.data)}


def check_config(config: MultihopConfig) -> None:
    """The file, its layout, the prompt and the limit, checked by reading the questions (no model, no torch)."""
    load_questions(config)


@task("multihop", config=MultihopConfig, score="reasoning", span="support", metric=score_answer,
      check=check_config, inputs=multihop_inputs)
def multihop_samples(tokenizer, config: MultihopConfig, max_positions: int | None = None) -> Iterator[EncodedSample]:
    """The file's questions, encoded (records whose supporting facts are missing are skipped); Eq. 2 on the
    supporting facts. `max_positions` is checked per sample by the run that traces them."""
    return (encode(s, tokenizer) for s in load_questions(config))


def load_questions(task: MultihopConfig):
    """The task's samples and load report; one-line errors name the file (unknown layout, nothing usable).

    No torch here: the CLI checks a bad file in a fraction of a second, before the model loads.
    """
    if task.format != "auto" and task.format not in formats:
        raise ConfigError(f"{task.data}: unknown format '{task.format}'; choose auto or one of: {', '.join(formats.names())}")
    if task.prompt not in PROMPTS:
        raise ConfigError(f"unknown multihop prompt '{task.prompt}'; choose one of: {', '.join(PROMPTS)}")
    if task.limit is not None and task.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {task.limit}")
    check_prompt_style(task.prompt_style)
    # "auto" is resolved with the model's tokenizer by the run; unresolved (checks before the model loads)
    # the records are built with the chat format, which validates the same file
    style = "chat" if task.prompt_style == "auto" else task.prompt_style
    loaded = multihop(task.data, task.limit, task.format, task.prompt, prompt_style=style)
    if not len(loaded):
        raise DataError(f"{task.data}: no usable records ({loaded.report.n_missing_support} of "
                        f"{loaded.report.n_records} skipped: supporting facts missing from their context)")
    return loaded


def load_multihop(path: str | Path, limit: int | None = None, format: str = "auto", prompt: str = "short",
                  keep_missing_support: bool = False, prompt_style: str = "chat") -> tuple[list[Sample], LoadReport]:
    """Read a multi-hop QA file into Samples; `limit` caps the samples kept (skipped records do not count).

    Records with a supporting fact missing from their context are skipped and counted in the report;
    with `keep_missing_support` they are kept with the support that is present (and still counted).
    """
    path = Path(path)
    if prompt not in PROMPTS:
        raise DataError(f"unknown multihop prompt '{prompt}'; choose one of: {', '.join(PROMPTS)}")
    records = read_records(path)
    name = detect_format(records[0], path) if format == "auto" else format
    parse = formats.get(name)
    report = LoadReport(str(path), name)
    samples: list[Sample] = []
    for i, rec in enumerate(records):
        if limit is not None and len(samples) >= limit:
            break
        report.n_records += 1
        raw = _parse_one(parse, rec, i, path)
        sample, n_missing = build_sample(raw, PROMPTS[prompt][prompt_style])
        sample.metadata.update(source=str(path), format=name, record_index=i)
        if n_missing:
            report.n_missing_support += 1
            if not keep_missing_support:
                report.skipped_ids.append(raw.id)
                continue
        samples.append(sample)
    report.n_loaded = len(samples)
    return samples, report


def build_sample(raw: RawRecord, prompt: PromptFormat) -> tuple[Sample, int]:
    """The Sample of one record and how many of its supporting facts are not in the context."""
    parts: list[str] = []
    paragraphs: list[dict[str, Any]] = []
    at = 0
    for p in raw.paragraphs:
        if parts:
            parts.append(PARAGRAPH_SEP)
            at += len(PARAGRAPH_SEP)
        header = f"{TITLE_PREFIX}{p.title}\n"
        text, sent_ranges = _join_sentences(p.sentences)
        start, text_start = at, at + len(header)
        parts += [header, text]
        at = text_start + len(text)
        paragraphs.append({"title": p.title, "start": start, "end": at, "text_start": text_start,
                           "is_supporting": p.supporting,
                           "sentences": [[text_start + s, text_start + e] for s, e in sent_ranges]})
    first = {}
    for i, p in enumerate(paragraphs):
        first.setdefault(p["title"], i)
    support: list[CharSpan] = []
    n_missing = 0
    if raw.facts is None:  # paragraph-level support
        support = [(p["text_start"], p["end"]) for p in paragraphs if p["is_supporting"] and p["end"] > p["text_start"]]
    else:
        for title, sid in raw.facts:
            p = paragraphs[first[title]] if title in first else None
            if p is None or not 0 <= sid < len(p["sentences"]) or p["sentences"][sid][0] == p["sentences"][sid][1]:
                n_missing += 1
                continue
            p["is_supporting"] = True
            support.append(tuple(p["sentences"][sid]))
    if not support:  # a record without any usable support cannot be scored with Eq. 2
        n_missing = max(n_missing, 1)
    facts = None if raw.facts is None else [list(f) for f in raw.facts]
    meta = {"paragraphs": paragraphs, "supporting_facts": facts, "n_missing_support": n_missing, **raw.extra}
    answer: str | list[str] = raw.answers[0] if len(raw.answers) == 1 else list(raw.answers)
    spans = {"support": sorted(set(support))}
    return Sample(raw.id, "".join(parts), raw.question, answer, spans, prompt, meta), n_missing


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON list or JSONL file; DataError naming the file (and line) otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty file")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not JSON or JSONL (line {n}: {e.msg})") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad} is not a JSON object")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def detect_format(record: dict[str, Any], path: Path | str = "<records>") -> str:
    """The registered layout whose detector accepts the first record; DataError if none does."""
    for name, accepts in _DETECTORS:
        if accepts(record):
            return name
    raise DataError(f"{path}: record 0 matches no known multihop layout ({', '.join(formats.names())})")


# --- support position and the Fig. 6 grid ---------------------------------------------------------

@dataclass(frozen=True)
class Fig6Bins:
    """Fig. 6 grid: axis ticks 250..3750 tokens and 5..95 % read as bin centres (our reading)."""

    length_step: int = 500  # tokens; bins [0,500), [500,1000), ... → centres 250, 750, ...
    n_length_bins: int = 8  # last centre 3750
    depth_step: float = 10.0  # percent; bins [0,10), ..., [90,100] → centres 5, ..., 95

    def length_centres(self) -> list[int]:
        return [self.length_step * i + self.length_step // 2 for i in range(self.n_length_bins)]

    def depth_centres(self) -> list[float]:
        return [self.depth_step * (i + 0.5) for i in range(self.n_depth_bins)]

    @property
    def n_depth_bins(self) -> int:
        return int(round(100 / self.depth_step))


def support_depth(spans: list[CharSpan], context_len: int) -> float:
    """Relative position of the supporting facts: their mean character position / context length × 100.

    The mean is over every support character (length-weighted span centres). Paper Sec. 4 bins
    samples by "depth" without defining it; this is our definition. NaN when there is no support.
    """
    total = sum(e - s for s, e in spans)
    if total <= 0 or context_len <= 0:
        return float("nan")
    centre = sum((s + e) / 2 * (e - s) for s, e in spans) / total
    return 100.0 * centre / context_len


def fig6_cell(context_tokens: int, depth: float, bins: Fig6Bins = Fig6Bins()) -> tuple[int, int] | None:
    """(length bin, depth bin) of a sample, or None when it falls outside the grid (or depth is NaN)."""
    li = context_tokens // bins.length_step
    if not 0 <= li < bins.n_length_bins or not 0 <= depth <= 100:
        return None
    return int(li), min(int(depth // bins.depth_step), bins.n_depth_bins - 1)


# --- layouts --------------------------------------------------------------------------------------

Parser = Callable[[dict[str, Any], int], RawRecord]
formats: Registry[Parser] = Registry("multihop format")


@formats.register("hotpotqa")
def _hotpotqa(r: dict[str, Any], i: int) -> RawRecord:
    paras = tuple(Paragraph(str(t), tuple(map(str, s))) for t, s in r["context"])
    facts = tuple((str(t), int(s)) for t, s in r["supporting_facts"])
    extra = {k: r[k] for k in ("type", "level", "dev_index") if k in r}
    return RawRecord(str(r["_id"]), r["question"], (str(r["answer"]),), paras, facts, extra)


@formats.register("2wiki")
def _2wiki(r: dict[str, Any], i: int) -> RawRecord:  # same layout as HotpotQA's, plus evidence triples
    return replace(_hotpotqa(r, i), extra={k: r[k] for k in ("type", "evidences", "dev_index") if k in r})


@formats.register("hotpotqa_hf")
def _hotpotqa_hf(r: dict[str, Any], i: int) -> RawRecord:
    c, sf = r["context"], r["supporting_facts"]
    paras = tuple(Paragraph(str(t), tuple(map(str, s))) for t, s in zip(c["title"], c["sentences"], strict=True))
    facts = tuple((str(t), int(s)) for t, s in zip(sf["title"], sf["sent_id"], strict=True))
    q = r["question"]
    rid = str(r.get("id") or f"hf{i:05d}-{hashlib.sha1(q.encode()).hexdigest()[:8]}")
    extra = {k: r[k] for k in ("type", "level") if k in r}
    return RawRecord(rid, q, (str(r["answer"]),), paras, facts, extra)


@formats.register("ircot")
def _ircot(r: dict[str, Any], i: int) -> RawRecord:
    answers = tuple(str(s) for a in r["answers_objects"] for s in a["spans"])
    paras = tuple(Paragraph(str(c["title"]), (str(c["paragraph_text"]),), bool(c["is_supporting"]))
                  for c in r["contexts"])
    if not answers:
        raise KeyError("answers_objects[].spans")
    return RawRecord(str(r["question_id"]), r["question_text"], answers, paras, None, {})


@formats.register("musique")
def _musique(r: dict[str, Any], i: int) -> RawRecord:
    paras = tuple(Paragraph(str(p["title"]), (str(p["paragraph_text"]),), bool(p["is_supporting"]))
                  for p in r["paragraphs"])
    answers = (str(r["answer"]), *map(str, r.get("answer_aliases", [])))
    return RawRecord(str(r["id"]), r["question"], answers, paras, None, {"answerable": r.get("answerable")})


_DETECTORS: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = (
    ("ircot", lambda r: "question_text" in r and "contexts" in r),
    ("musique", lambda r: "paragraphs" in r and "question" in r),
    ("hotpotqa_hf", lambda r: isinstance(r.get("context"), dict)),
    ("2wiki", lambda r: isinstance(r.get("context"), list) and "evidences" in r),
    ("hotpotqa", lambda r: isinstance(r.get("context"), list) and "supporting_facts" in r),
)


def _parse_one(parse: Parser, rec: dict[str, Any], i: int, path: Path) -> RawRecord:
    try:
        raw = parse(rec, i)
    except KeyError as e:
        raise DataError(f"{path}: record {i}: missing field {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: record {i}: malformed ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    if not isinstance(raw.question, str) or not raw.question.strip():
        raise DataError(f"{path}: record {i}: empty or non-string question")
    return raw


def _join_sentences(sentences: tuple[str, ...]) -> tuple[str, list[CharSpan]]:
    """Concatenate sentences (a space only where neither side has one) and their stripped char ranges."""
    text, ranges = "", []
    for s in sentences:
        if text and s and not text[-1].isspace() and not s[0].isspace():
            text += " "
        lead = len(s) - len(s.lstrip())
        body = s.strip()
        start = len(text) + lead
        ranges.append((start, start + len(body)) if body else (len(text), len(text)))
        text += s
    return text, ranges
