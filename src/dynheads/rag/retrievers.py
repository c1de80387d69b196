"""What to show: head-attention context windows (paper Alg. 2, in-context) and BM25 (external, DRAGIN).

In-context windows (Alg. 2 steps 3-5; the paper gives none of k, the window size or the clustering):
  1. average the selected heads' attention over the context positions;
  2. take the top-k positions (k = 10; ties go to the earlier position);
  3. cluster them in 1-D: sort, split wherever the gap between neighbours exceeds `max_gap`
     (default window // 2 = 32 tokens). This is exactly single-linkage agglomerative clustering
     with distance threshold `max_gap` (sklearn AgglomerativeClustering(linkage="single")), done
     with numpy because in 1-D it is a sort and a diff;
  4. the representative of a cluster is its position of maximum attention (earliest on ties);
  5. a window of `window` tokens (64) centred on it, shifted to stay inside the context;
  6. overlapping or touching windows are merged. Optionally windows grow to whole sentences.
Token ranges are [start, end) relative to the first context token.

BM25 (`bm25s`, k1 0.9, b 0.4 as in the data README's check; title + text; bm25s' English stop
words, no stemmer): the index is built once and cached in `<corpus>.bm25s/<key>/` when the corpus
folder is writable, else in `$DYNHEADS_CACHE/bm25/` or `~/.cache/dynheads/bm25/`; `key` hashes the
corpus size, mtime and the index settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from dynheads.errors import DataError
from dynheads.rag.trigger import token_words
from dynheads.registry import Registry

log = logging.getLogger(__name__)
TokenSpan = tuple[int, int]

# --- defaults where the paper is silent (README choices table) -------------------------------------
TOP_K_POSITIONS = 10  # top-k attended context positions (Alg. 2 step 3)
WINDOW = 64  # tokens per window around a cluster representative (Alg. 2 step 4)
QUERY_WORDS = 25  # DRAGIN retrieve_keep_top_k for 2Wiki (35 for HotpotQA) in its configs
BM25_K1, BM25_B = 0.9, 0.4
_INDEX_VERSION = "1"

retrievers: Registry[Callable[..., Any]] = Registry("retriever")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float


def head_windows(attention: np.ndarray, k: int = TOP_K_POSITIONS, window: int = WINDOW,
                 max_gap: int | None = None) -> list[TokenSpan]:
    """Alg. 2 steps 3-5: context token ranges to unmask, from attention [n_heads, S] or [S] (head mean)."""
    att = np.asarray(attention, dtype=np.float64)
    att = att.mean(axis=0) if att.ndim == 2 else att
    if att.ndim != 1:
        raise ValueError(f"attention must be [n_heads, S] or [S], got shape {np.shape(attention)}")
    n = att.shape[0]
    if n == 0 or k <= 0:
        return []
    gap = window // 2 if max_gap is None else max_gap
    top = np.sort(np.argsort(-att, kind="stable")[: min(k, n)])
    clusters = np.split(top, np.flatnonzero(np.diff(top) > gap) + 1)
    reps = [int(c[np.argmax(att[c])]) for c in clusters]
    return merge_ranges([_window(r, window, n) for r in reps])


def snap_to_sentences(ranges: list[TokenSpan], sentences: list[TokenSpan]) -> list[TokenSpan]:
    """Grow each range to the union of the sentences (token ranges) it overlaps, then merge."""
    out = []
    for s, e in ranges:
        hit = [(a, b) for a, b in sentences if a < e and b > s]
        out.append((min([s] + [a for a, _ in hit]), max([e] + [b for _, b in hit])))
    return merge_ranges(out)


def merge_ranges(ranges: list[TokenSpan]) -> list[TokenSpan]:
    """Sorted union of [start, end) ranges; overlapping or touching ranges become one."""
    out: list[TokenSpan] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def query_from_attention(tokens: Sequence[str], weights: np.ndarray, n: int = QUERY_WORDS,
                         exclude: Sequence[str] = ()) -> str:
    """DRAGIN QFS: the top-n content words by attention, in their original order, joined by spaces.

    tokens [S] are decoded token strings and weights [S] the attention each gets; a word's weight is
    the sum over its tokens. Stop words (scikit-learn's list), words in `exclude` (e.g. the flagged
    tokens) and repeats (kept at their first position with their largest weight) are dropped.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(tokens),):
        raise ValueError(f"weights {w.shape} do not match {len(tokens)} tokens")
    skip = {x.lower() for x in exclude} | ENGLISH_STOP_WORDS
    best: dict[str, tuple[float, int, str]] = {}
    for i, (word, s, e) in enumerate(token_words(tokens)):
        key = word.lower()
        if key in skip:
            continue
        score = float(w[s:e].sum())
        first = best.get(key, (score, i, word))
        best[key] = (max(score, first[0]), first[1], first[2])
    top = sorted(best.values(), key=lambda v: (-v[0], v[1]))[:n]
    return " ".join(word for _, _, word in sorted(top, key=lambda v: v[1]))


@retrievers.register("in_context_heads")
@dataclass(frozen=True)
class HeadWindowRetriever:
    """Alg. 2: windows of the context chosen by the selected heads' attention."""

    k: int = TOP_K_POSITIONS  # paper silent
    window: int = WINDOW  # paper silent
    max_gap: int | None = None  # cluster split gap; None = window // 2 (paper silent)
    snap_sentences: bool = False  # grow windows to whole sentences (our option; off = paper's fixed size)

    def retrieve(self, attention: np.ndarray, sentences: list[TokenSpan] | None = None) -> list[TokenSpan]:
        ranges = head_windows(attention, self.k, self.window, self.max_gap)
        return snap_to_sentences(ranges, sentences) if self.snap_sentences and sentences else ranges


@retrievers.register("bm25")
@dataclass
class BM25Retriever:
    """BM25 over a JSONL corpus of {id, title, text}; `n_docs` is the number of passages indexed."""

    corpus: str
    k1: float = BM25_K1
    b: float = BM25_B
    cache_dir: str | None = None  # None: beside the corpus if writable, else $DYNHEADS_CACHE or ~/.cache
    passages: list[dict[str, str]] = field(init=False, repr=False)
    index_dir: Path = field(init=False)

    def __post_init__(self):
        import bm25s

        self.passages = read_corpus(Path(self.corpus))
        self.index_dir = index_location(Path(self.corpus), self._settings(), self.cache_dir)
        if (self.index_dir / "params.index.json").exists():
            self._bm25 = bm25s.BM25.load(str(self.index_dir), show_progress=False)
        else:
            self._bm25 = _build_index(self.passages, self.k1, self.b, self.index_dir)
        log.info("BM25 index %s: %d passages", self.index_dir, self.n_docs)

    @property
    def n_docs(self) -> int:
        return len(self.passages)

    def retrieve(self, query: str, k: int = 3) -> list[Passage]:
        return self.search(query, k)

    def search(self, query: str, k: int = 10) -> list[Passage]:
        """The k best passages for `query`, best first (fewer when fewer match a query term)."""
        import bm25s

        terms = bm25s.tokenize([query], return_ids=False, show_progress=False)[0]
        terms = [t for t in terms if t in self._bm25.vocab_dict]
        if not terms or k <= 0:
            return []
        docs, scores = self._bm25.retrieve([terms], k=min(k, self.n_docs), show_progress=False)
        return [Passage(self.passages[i]["id"], self.passages[i]["title"], self.passages[i]["text"], float(s))
                for i, s in zip(docs[0].tolist(), scores[0].tolist()) if s > 0]

    def _settings(self) -> str:
        return f"v{_INDEX_VERSION}-k1={self.k1}-b={self.b}-title+text-stop=en"


def read_corpus(path: Path) -> list[dict[str, str]]:
    """Passages of a JSONL corpus ({id?, title, text}); DataError naming the file and line otherwise."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read corpus ({type(e).__name__})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e.msg}); the corpus must be JSONL") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("title"), str) or not isinstance(rec.get("text"), str):
            raise DataError(f"{path}: line {n} lacks a string 'title' and 'text'")
        out.append({"id": str(rec.get("id", f"line{n}")), "title": rec["title"], "text": rec["text"]})
    if not out:
        raise DataError(f"{path}: empty corpus")
    return out


def index_location(corpus: Path, settings: str, cache_dir: str | Path | None = None) -> Path:
    """Where the cached index of `corpus` lives: key = hash(size, mtime, settings)."""
    st = corpus.stat()
    key = hashlib.sha1(f"{st.st_size}-{st.st_mtime_ns}-{settings}".encode()).hexdigest()[:16]
    if cache_dir is not None:
        return Path(cache_dir) / f"{corpus.name}-{key}"
    if _writable(corpus.parent):
        return corpus.parent / f"{corpus.name}.bm25s" / key
    root = Path(os.environ.get("DYNHEADS_CACHE") or Path.home() / ".cache" / "dynheads")
    return root / "bm25" / f"{corpus.name}-{key}"


def _writable(folder: Path) -> bool:
    """Writable by mode bits and access; the bits matter because root passes os.access everywhere."""
    return bool(folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(folder, os.W_OK)


def _build_index(passages: list[dict[str, str]], k1: float, b: float, dest: Path):
    import bm25s

    texts = [p["title"] + " " + p["text"] for p in passages]
    bm25 = bm25s.BM25(k1=k1, b=b)
    bm25.index(bm25s.tokenize(texts, return_ids=False, show_progress=False), show_progress=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        bm25.save(str(tmp), show_progress=False)
        tmp.replace(dest)  # atomic: a concurrent builder's finished index wins, ours is dropped
    except OSError:
        if not (dest / "params.index.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bm25


def _window(centre: int, size: int, n: int) -> TokenSpan:
    start = min(max(centre - size // 2, 0), max(n - size, 0))
    return start, min(start + size, n)
