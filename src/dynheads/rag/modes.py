"""What a Dynamic RAG retrieval opens (Alg. 2 steps 3-5): context windows, or passages from a corpus.

A mode gets the identification step (attention rows of every head, final hidden state) and the heads a
strategy picked, opens something, and regenerates the retracted sentence under it:

  in-context  (paper) the picked heads' attention over the context → top-k positions → clusters →
              windows (`retrievers.HeadWindowRetriever`); the sentence is regenerated with exactly
              those windows visible, in the same KV cache.
  corpus      (ours, DRAGIN-style) the picked heads' attention over the context, the question and the
              generated text → the top content words as a query (`retrievers.query_from_attention`)
              → BM25 passages → a new prompt with the passages as its context, prefilled once per
              retrieval; the sentence is regenerated there and then appended to the main prompt's text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from dynheads.errors import ConfigError
from dynheads.rag.loop import Opened, Session
from dynheads.rag.retrievers import QUERY_WORDS, HeadWindowRetriever, query_from_attention
from dynheads.registry import Registry
from dynheads.tasks.base import Sample, encode, tokenize_prompt
from dynheads.tracing.tracer import StepView

N_PASSAGES = 3  # passages per corpus retrieval: DRAGIN's retrieve_topk (paper: no corpus at all)

retrieval_modes: Registry[Callable[..., Any]] = Registry("retrieval mode")


@retrieval_modes.register("in-context")
@dataclass(frozen=True)
class ContextWindows:
    """Alg. 2: open the windows the picked heads' mean attention points at; regenerate in place."""

    windows: Any = field(default_factory=HeadWindowRetriever)  # .retrieve(attention [n, S]) -> [(start, end)]
    row_spans: ClassVar[tuple[str, ...]] = ("context",)
    in_context: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, settings) -> "ContextWindows":
        """From an `runners.rag.RagSettings` (its `windows` retriever)."""
        return cls(settings.windows)

    def open(self, session: Session, view: StepView, heads: np.ndarray, flagged: list[str]) -> Opened:
        rows = view.arrays["rows_context"][heads]  # [n heads, context tokens]
        ranges = [(int(s), int(e)) for s, e in self.windows.retrieve(rows)]
        hidden = session.hidden_all.copy()
        cs = session.context[0]
        for s, e in ranges:
            hidden[cs + s: cs + e] = False
        return Opened(session.sentence(session.state, hidden, session.budget), ranges)


@retrieval_modes.register("corpus")
@dataclass
class CorpusPassages:
    """DRAGIN-style external retrieval driven by the picked heads; `retriever` is e.g. a BM25Retriever."""

    retriever: Any  # .retrieve(query, k) -> [Passage(id, title, text, score)]
    n_passages: int = N_PASSAGES
    query_words: int = QUERY_WORDS  # DRAGIN retrieve_keep_top_k (25 for 2Wiki, 35 for HotpotQA)
    row_spans: ClassVar[tuple[str, ...]] = ("context", "text")
    in_context: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings) -> "CorpusPassages":
        """BM25 over `settings.corpus` (the index is built once and cached; see rag.retrievers)."""
        from dynheads.rag.retrievers import BM25Retriever

        if settings.corpus is None:
            raise ConfigError("--retrieval corpus needs --corpus PATH (JSONL of {id, title, text})")
        return cls(BM25Retriever(settings.corpus), settings.n_passages, settings.query_words)

    def open(self, session: Session, view: StepView, heads: np.ndarray, flagged: list[str]) -> Opened:
        state, enc = session.state, session.encoded
        cs, ce = session.context
        keep = np.array(list(range(cs, ce)) + _question_positions(session) + list(range(enc.prompt_len, len(state.ids))))
        weights = np.concatenate([view.arrays["rows_context"][heads].mean(0), view.arrays["rows_text"][heads].mean(0)])
        weights = weights[keep - cs]  # rows_context covers [cs, ce), rows_text [ce, len(ids))
        tokens = session.decode([state.ids[p] for p in keep])
        query = query_from_attention(tokens, weights, self.query_words, exclude=[t.strip() for t in flagged])
        passages = self.retriever.retrieve(query, self.n_passages) if query else []
        context = "\n\n".join(f"Title: {p.title}\n{p.text}" for p in passages) or "(no passages found)"
        prompt = encode(Sample(enc.sample.id, context, enc.sample.question, enc.sample.answer, {},
                               enc.sample.prompt), session.lm.tokenizer)
        side = session.tracer.prefill(prompt.input_ids + state.ids[enc.prompt_len:])  # once per retrieval
        sentence = session.sentence(side, None, session.budget)
        session.tracer.extend(state, sentence.ids, hidden_keys=session.hidden_all)
        found = [{"id": p.id, "title": p.title, "score": round(float(p.score), 4)} for p in passages]
        return Opened(sentence, [], query, found)


def _question_positions(session: Session) -> list[int]:
    """Token positions of the question in the prompt (located by character offsets after the context)."""
    enc, tok = session.encoded, session.lm.tokenizer
    text, question = enc.prompt_text, enc.sample.question
    at = text.find(question, text.find(enc.sample.context) + len(enc.sample.context))
    if at < 0 or not getattr(tok, "is_fast", False):
        return []
    offsets = tokenize_prompt(tok, text, enc.sample.prompt.style)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if a < at + len(question) and b > at and b > a]
