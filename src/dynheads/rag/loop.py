"""Dynamic RAG (paper Sec. 5, Alg. 1-2) over the tracer: draft a sentence, RIND, retrieve via heads, regenerate.

In-context retrieval (the paper's setting): the context paragraphs stay in the prompt but are hidden
(`DecodeState.hidden_keys`) from the question and the generated text. One question runs as:

  1. the prompt up to the end of the context is prefilled with everything visible (shareable between
     strategies: `prepare`); the question part is then extended with the context hidden — or visible
     for a strategy whose context starts visible (`full`);
  2. draft one sentence under the current mask (the tracer stops one token after the sentence ends,
     so the step whose query is the sentence's last token is recorded too; that token is discarded);
  3. RIND (the injected trigger) scores the draft: entropy of each token × the largest attention a later
     draft token pays it (layer `rind_layer`: per head, then the mean over heads as DRAGIN does; from the
     same pass that generated it);
  4. no trigger: accept the sentence. Trigger: cut the draft back to the start of the sentence holding
     the flagged token, run ONE identification step with the whole context visible (rows over the
     context for all heads, final hidden state), let the head set pick its heads, and let the injected
     retrieval mode open something (`rag.modes`: context windows, or BM25 passages in a new prompt);
     the sentence is regenerated there and appended; the context is hidden again for the next draft.

KV semantics (our choice; the paper's implementation is not public): a mask change applies to the
queries that run after it. Keys and values already in the cache stay as computed (the question's were
computed with the context hidden), so nothing is re-encoded except in corpus mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from dynheads.headsets.apply import check_decides
from dynheads.headsets.base import HeadSet
from dynheads.rag.trigger import Trigger, sentence_ranges
from dynheads.tasks.base import EncodedSample
from dynheads.tracing.tracer import DecodeState, StepView, Tracer

ANSWER_CUE = "the answer is"


@dataclass(frozen=True)
class RagConfig:
    """Loop settings; the paper states none of them (README choices table)."""

    max_new_tokens: int = 100  # answer budget in accepted tokens: DRAGIN's HotpotQA generate_max_length
    max_sentence_tokens: int = 40  # cap on one drafted sentence (a draft without a sentence end stops here)
    rind_layer: int = -1  # RIND attention from this layer: per-head max, then mean over heads (DRAGIN: last layer)
    stop_on_answer: bool = True  # stop after the sentence that says "the answer is" (DRAGIN's stop rule)
    max_retrievals: int | None = None  # per question; None = whenever RIND asks (DRAGIN has no cap)


@dataclass
class Sentence:
    """Tokens accepted from one generation call; `views[t]` produced token t, views[T] (if any) read it."""

    ids: list[int]
    tokens: list[str]
    views: list[StepView]
    eos: bool = False


@dataclass
class Opened:
    """What a retrieval mode opened and the sentence regenerated under it."""

    sentence: Sentence
    windows: list[tuple[int, int]] = field(default_factory=list)  # context token ranges, relative to its start
    query: str | None = None
    passages: list[dict[str, Any]] | None = None


class RetrievalMode(Protocol):
    row_spans: tuple[str, ...]  # spans the identification step records attention rows over
    in_context: bool  # opens windows of the prompt's own context (support coverage is defined)

    def open(self, session: "Session", view: StepView, heads: np.ndarray, flagged: list[str]) -> Opened:
        """Open context for the sentence being regenerated and regenerate it (Alg. 2 steps 3-5 + Alg. 1)."""


@dataclass
class Retrieval:
    """One retrieval: where RIND fired, which heads were used and what they opened."""

    draft_tokens: int
    flagged: int  # index of the flagged token in the draft
    flagged_token: str
    heads: list[int]  # flat (layer-major) indices
    windows: list[tuple[int, int]]
    query: str | None
    passages: list[dict[str, Any]] | None
    regenerated: str


@dataclass
class RagResult:
    """One question under one strategy."""

    strategy: str  # the head set's registry name
    token_ids: list[int]
    response: str
    retrievals: list[Retrieval]
    n_drafts: int
    stopped: str  # eos | answer | budget
    arrays: dict[str, np.ndarray]  # per accepted token: token_id, token_entropy, regenerated, mass_* [T, L, H]
    support_coverage: float | None  # fraction of support tokens inside any opened window (in-context)
    opened_fraction: float | None  # fraction of context tokens inside any opened window (in-context)


@dataclass
class Prepared:
    """A prompt prefilled up to the end of its context (all visible), shared by every strategy."""

    state: DecodeState
    n_ids: int


def prepare(tracer: Tracer, encoded: EncodedSample) -> Prepared:
    """Prefill the system prompt and the context once (the context sees itself; nothing is hidden yet)."""
    cs, ce = encoded.context_tokens
    spans = {**encoded.token_spans, "context": [(cs, ce)]}
    return Prepared(tracer.prefill(encoded.input_ids[: ce + 1], spans), ce + 1)


def run(tracer: Tracer, encoded: EncodedSample, trigger: Trigger, retriever: RetrievalMode, heads: HeadSet,
        config: RagConfig = RagConfig(), rng: np.random.Generator | None = None,
        prepared: Prepared | None = None) -> RagResult:
    """Alg. 1 for one question: sentences drafted under the mask, RIND, head-driven retrieval, regeneration.

    `heads` (built for this question) chooses its heads at each identification step, which it sees as the
    step's `current` pass; `rng` is its generator. A constant head set never retrieves: `none` keeps the
    context hidden (w/o RAG), `all` shows all of it from the start (the full-context bound).
    """
    check_decides(heads, "Dynamic RAG")
    session = Session(tracer, encoded, config, retriever, prepared)
    rng = rng if rng is not None else np.random.default_rng(0)
    pick = heads.constant is None
    mask = session.begin(heads.constant is True)
    retrievals: list[Retrieval] = []
    n_drafts, stopped = 0, "budget"
    while session.budget > 0:
        start = len(session.state.ids)
        draft = session.sentence(session.state, mask, session.budget)
        n_drafts += 1
        can_retrieve = pick and (config.max_retrievals is None or len(retrievals) < config.max_retrievals)
        decision = trigger.should_retrieve(*session.rind_inputs(draft)) if can_retrieve and draft.ids else None
        if decision is None or not decision.retrieve:
            session.accept(draft)
        else:
            pos = int(decision.position)
            keep = next(s for s, e in sentence_ranges(draft.tokens) if s <= pos < e)
            tracer.rewind(session.state, start + keep)  # retract to the sentence holding the flagged token
            session.accept(Sentence(draft.ids[:keep], draft.tokens[:keep], draft.views[:keep]))
            view = session.identify()
            chosen = heads.at(len(session.ids), tracer.lm.layout, rng=rng, current=view, sample=encoded,
                              span="support")
            opened = retriever.open(session, view, chosen, [draft.tokens[pos]])
            session.accept(opened.sentence, regenerated=True)
            retrievals.append(Retrieval(len(draft.ids), pos, draft.tokens[pos], np.flatnonzero(chosen).tolist(),
                                        opened.windows, opened.query, opened.passages, "".join(opened.sentence.tokens)))
            draft = opened.sentence
        if draft.eos:
            stopped = "eos"
            break
        if config.stop_on_answer and ANSWER_CUE in "".join(session.tokens).lower():
            stopped = "answer"
            break
        if not draft.ids:  # nothing generated and no end of turn: cannot progress
            break
    return session.result(heads, retrievals, n_drafts, stopped)


class Session:
    """One question's decoding state and the tracer views the loop and the retrieval modes use."""

    def __init__(self, tracer: Tracer, encoded: EncodedSample, config: RagConfig, retriever: RetrievalMode,
                 prepared: Prepared | None):
        self.tracer, self.encoded, self.config, self.retriever = tracer, encoded, config, retriever
        self.lm = tracer.lm
        self.draft_tracer = Tracer(tracer.lm, replace(tracer.config, mass_spans=("context", "support"),
                                                      row_spans=("draft",), record_hidden=False, topk=1))
        self.id_tracer = Tracer(tracer.lm, replace(tracer.config, max_new_tokens=1, mass_spans=(),
                                                   row_spans=tuple(retriever.row_spans), record_hidden=True, topk=1))
        self.prepared = prepared or prepare(tracer, encoded)
        self.state = self.prepared.state
        self.context = tuple(encoded.context_tokens)
        self.hidden_all = np.zeros(encoded.prompt_len, bool)
        self.hidden_all[self.context[0]: self.context[1]] = True
        self.ids: list[int] = []
        self.tokens: list[str] = []
        self.rows: list[dict[str, np.ndarray]] = []
        self.budget = config.max_new_tokens
        self._pieces: dict[int, str] = {}

    def begin(self, context_visible: bool) -> np.ndarray | None:
        """Rewind the shared prefill to the context's end and extend the question under the initial mask."""
        mask = None if context_visible else self.hidden_all
        self.tracer.rewind(self.state, self.prepared.n_ids)
        self.tracer.extend(self.state, self.encoded.input_ids[self.prepared.n_ids:], hidden_keys=mask)
        return mask

    def decode(self, ids: list[int]) -> list[str]:
        out = []
        for t in ids:
            if t not in self._pieces:
                self._pieces[t] = self.lm.tokenizer.decode([t])
            out.append(self._pieces[t])
        return out

    def sentence(self, state: DecodeState, hidden: np.ndarray | None, budget: int) -> Sentence:
        """Generate one sentence in `state` under `hidden` and keep it there (the look-ahead token is dropped)."""
        limit = max(min(self.config.max_sentence_tokens, budget), 0)
        start = len(state.ids)
        state.hidden_keys = hidden
        state.spans["draft"] = [(start, start + limit + 1)]
        views: list[StepView] = []
        trace = self.draft_tracer.generate(state, max_new_tokens=limit + 1, intervention=lambda v: views.append(v),
                                           stop=lambda new: len(sentence_ranges(self.decode(new))) >= 2, fork=False)
        new = state.ids[start:]
        tokens = self.decode(new)
        ranges = sentence_ranges(tokens)
        n = ranges[0][1] if len(ranges) >= 2 else min(len(new), limit)
        self.tracer.rewind(state, start + n)
        return Sentence(new[:n], tokens[:n], views[: n + 1], eos=trace.stop_id is not None and n == len(new))

    def rind_inputs(self, s: Sentence) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """RIND's entropy [T], per-head attention among the draft's tokens [heads, T, T] (row j: token j as the
        query; layer `rind_layer`), tokens."""
        n = len(s.ids)
        entropy = np.array([v.entropy for v in s.views[:n]], np.float64)
        att = np.zeros((self.lm.layout.n_heads, n, n))
        for j in range(n):
            if j + 1 < len(s.views):
                att[:, j] = s.views[j + 1].arrays["rows_draft"][self.config.rind_layer][:, :n]
        return entropy, att, s.tokens

    def identify(self) -> StepView:
        """Alg. 2 step 1: one step with the whole context visible, recording rows and the hidden state."""
        state = self.state
        state.hidden_keys = None
        state.spans["text"] = [(self.context[1], len(state.ids))]
        views: list[StepView] = []
        self.id_tracer.generate(state, max_new_tokens=1, intervention=lambda v: views.append(v), fork=True)
        return views[0]

    def accept(self, s: Sentence, regenerated: bool = False) -> None:
        self.ids += s.ids
        self.tokens += s.tokens
        self.budget -= len(s.ids)
        shape = self.lm.layout.shape
        for v in s.views[: len(s.ids)]:
            row = {"token_entropy": np.float32(v.entropy), "regenerated": regenerated}
            for name in ("mass_context", "mass_support"):
                row[name] = v.arrays.get(name, np.full(shape, np.nan, np.float32))
            self.rows.append(row)

    def result(self, heads: HeadSet, retrievals: list[Retrieval], n_drafts: int, stopped: str) -> RagResult:
        arrays = {"token_id": np.array(self.ids, np.int64)}
        shape = self.lm.layout.shape
        for name, dtype, empty in (("token_entropy", np.float32, ()), ("regenerated", bool, ()),
                                   ("mass_context", np.float32, shape), ("mass_support", np.float32, shape)):
            arrays[name] = (np.array([r[name] for r in self.rows], dtype) if self.rows
                            else np.zeros((0, *empty), dtype))
        coverage, opened = self._coverage([w for r in retrievals for w in r.windows], heads.constant is True)
        response = self.lm.tokenizer.decode(self.ids, skip_special_tokens=True)
        return RagResult(heads.name, list(self.ids), response, retrievals, n_drafts, stopped, arrays,
                         coverage, opened)

    def _coverage(self, windows: list[tuple[int, int]], all_visible: bool) -> tuple[float | None, float | None]:
        """Support coverage and opened fraction of the context (None when the mode opens no context windows)."""
        if not (self.retriever.in_context or all_visible):
            return None, None
        cs, ce = self.context
        seen = np.full(ce - cs, all_visible)
        for s, e in windows:
            seen[s:e] = True
        support = [p - cs for s, e in self.encoded.token_spans.get("support", []) for p in range(s, e) if cs <= p < ce]
        return (float(seen[support].mean()) if support else None), float(seen.mean())
