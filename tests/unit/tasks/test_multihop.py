"""Multi-hop loaders on the real shared files, their spans, bad input, and exact token spans."""
from __future__ import annotations

import hashlib
import json
import math

import pytest

from dynheads.errors import ConfigError, DataError
from dynheads.registry import Spec
from dynheads.tasks.base import encode, tasks
from dynheads.tasks.multihop import Fig6Bins, fig6_cell, load_multihop, support_depth

from conftest import SHARED_DATA as DATA

needs_data = pytest.mark.usefixtures("shared_data")  # skips with the reason when ../shared/data is absent
HF = DATA / "hotpotqa/hotpotqa_dev_distractor_first100_hf.json"
IRCOT = DATA / "hotpotqa/hotpotqa_dev_distractor_ircot_first250.jsonl"
FULLWIKI = DATA / "hotpotqa/hotpotqa_dev_fullwiki_sample500.json"
WIKI2 = DATA / "2wikimultihopqa/2wikimultihopqa_dev_first250.json"


def _sentences_of(context_pairs, facts):
    """Stripped supporting sentences, computed straight from the raw record (the reference)."""
    paras = {}
    for title, sents in context_pairs:
        paras.setdefault(title, sents)
    return sorted(paras[t][i].strip() for t, i in facts)


@needs_data
@pytest.mark.parametrize("path, fmt, n", [(HF, "hotpotqa_hf", 100), (IRCOT, "ircot", 250), (WIKI2, "2wiki", 250)])
def test_counts_and_detected_format(path, fmt, n):
    samples, report = load_multihop(path)
    assert (report.format, report.n_records, report.n_loaded, report.n_missing_support) == (fmt, n, n, 0)
    assert len(samples) == n and len({s.id for s in samples}) == n
    assert all(s.spans["support"] for s in samples)


@needs_data
def test_hf_support_spans_are_the_supporting_sentences():
    raw = json.loads(HF.read_text())
    samples, _ = load_multihop(HF)
    for rec, s in zip(raw, samples):
        pairs = list(zip(rec["context"]["title"], rec["context"]["sentences"]))
        facts = list(zip(rec["supporting_facts"]["title"], rec["supporting_facts"]["sent_id"]))
        assert sorted(s.context[a:b] for a, b in s.spans["support"]) == _sentences_of(pairs, facts)
        assert s.answer == rec["answer"] and s.question == rec["question"]


@needs_data
def test_hf_layout_has_no_id_so_ids_are_stable_hashes():
    raw = json.loads(HF.read_text())
    assert "_id" not in raw[0]
    a, _ = load_multihop(HF, limit=5)
    b, _ = load_multihop(HF, limit=5)
    assert [s.id for s in a] == [s.id for s in b]
    assert a[3].id == f"hf00003-{hashlib.sha1(raw[3]['question'].encode()).hexdigest()[:8]}"


@needs_data
def test_2wiki_support_spans_and_paragraph_metadata():
    raw = json.loads(WIKI2.read_text())
    samples, _ = load_multihop(WIKI2)
    for rec, s in zip(raw, samples):
        assert s.id == rec["_id"]
        assert sorted(s.context[a:b] for a, b in s.spans["support"]) == _sentences_of(rec["context"], rec["supporting_facts"])
        paras = s.metadata["paragraphs"]
        assert [p["title"] for p in paras] == [t for t, _ in rec["context"]]
        assert s.context == "\n\n".join(s.context[p["start"]:p["end"]] for p in paras)
        for p, (title, sents) in zip(paras, rec["context"]):
            assert s.context[p["start"]:p["text_start"]] == f"Title: {title}\n"
            assert [s.context[x:y] for x, y in p["sentences"]] == [t.strip() for t in sents]
        gold_titles = {t for t, _ in rec["supporting_facts"]}
        assert {p["title"] for p in paras if p["is_supporting"]} == gold_titles


@needs_data
def test_ircot_support_is_the_whole_supporting_paragraphs():
    lines = [json.loads(x) for x in IRCOT.read_text().splitlines()[:50]]
    samples, _ = load_multihop(IRCOT, limit=50)
    for rec, s in zip(lines, samples):
        gold = sorted(c["paragraph_text"] for c in rec["contexts"] if c["is_supporting"])
        assert sorted(s.context[a:b] for a, b in s.spans["support"]) == gold
        assert s.id == rec["question_id"] and s.answers == rec["answers_objects"][0]["spans"]
        assert s.metadata["supporting_facts"] is None


@needs_data
def test_fullwiki_missing_support_is_counted_and_reported():
    raw = json.loads(FULLWIKI.read_text())
    complete = [r for r in raw if {t for t, _ in r["supporting_facts"]} <= {t for t, _ in r["context"]}]
    samples, report = load_multihop(FULLWIKI)
    assert len(complete) == 134  # the data README's figure, recomputed
    assert (report.n_records, report.n_loaded, report.n_missing_support) == (500, 134, 366)
    assert set(report.skipped_ids) == {r["_id"] for r in raw} - {r["_id"] for r in complete}
    kept, report2 = load_multihop(FULLWIKI, keep_missing_support=True)
    assert (report2.n_loaded, report2.n_missing_support, report2.skipped_ids) == (500, 366, [])
    assert sum(s.metadata["n_missing_support"] > 0 for s in kept) == 366


@needs_data
def test_limit_counts_kept_samples_and_task_registry():
    samples, report = load_multihop(FULLWIKI, limit=10)
    assert report.n_loaded == 10 and report.n_records > 10
    t = tasks.create(Spec("multihop", {"path": str(HF), "limit": 4, "prompt": "cot"}))
    assert len(list(t)) == 4 and t.report.n_loaded == 4
    assert "So the answer is" in t[0].prompt.user


@pytest.mark.parametrize("content, needle", [
    ('[{"question": "q"', "not valid JSON (line 1"),
    ('{"question_id": "a"}\nnot json\n', "not JSON or JSONL (line 2"),
    ('[{"_id": "x", "question": "q", "answer": "a", "supporting_facts": [], "context": [["T", ["s"]]]},'
     ' {"_id": "y", "answer": "a", "supporting_facts": [], "context": []}]', "record 1: missing field 'question'"),
    ('[{"_id": "x", "question": "q", "answer": "a", "supporting_facts": [["T"]], "context": [["T", ["s"]]]}]',
     "record 0: malformed"),
    ('[1, 2]', "record 0 is not a JSON object"),
    ('[{"foo": 1}]', "record 0 matches no known multihop layout"),
    ('', "empty file"),
])
def test_bad_files_raise_one_line_data_errors(tmp_path, content, needle):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_multihop(f)
    msg = str(e.value)
    assert needle in msg and str(f) in msg and "\n" not in msg


@needs_data
def test_forced_format_mismatch_and_unknown_format():
    with pytest.raises(DataError, match=r"record 0: missing field 'answers_objects'"):
        load_multihop(HF, format="ircot")
    with pytest.raises(ConfigError, match="unknown multihop format 'squad'"):
        load_multihop(HF, format="squad")


def _tiny_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return fast


@needs_data
def test_encoding_real_records_maps_support_to_exact_tokens():
    samples = load_multihop(HF, limit=3)[0] + load_multihop(IRCOT, limit=2)[0] + load_multihop(WIKI2, limit=3)[0]
    tokenizer = _tiny_tokenizer([s.context for s in samples[:2]])
    for s in samples:
        enc = encode(s, tokenizer)
        offsets = tokenizer(enc.prompt_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ctx_at = enc.prompt_text.index(s.context)
        expected = {i for a, b in s.spans["support"] for i, (x, y) in enumerate(offsets)
                    if y > x and x < b + ctx_at and y > a + ctx_at}
        assert set(enc.span_positions("support")) == expected
        covered = tokenizer.decode([enc.input_ids[i] for i in sorted(expected)])
        for a, b in s.spans["support"]:
            assert s.context[a:b] in covered
        cs, ce = enc.context_tokens
        assert offsets[cs][0] <= ctx_at < offsets[cs][1] and ce - cs > 100


def test_support_depth_and_fig6_cells():
    assert support_depth([(0, 10)], 100) == pytest.approx(5.0)
    assert support_depth([(0, 10), (80, 100)], 100) == pytest.approx((5 * 10 + 90 * 20) / 30)
    assert math.isnan(support_depth([], 100))
    bins = Fig6Bins()
    assert bins.length_centres() == [250, 750, 1250, 1750, 2250, 2750, 3250, 3750]
    assert bins.depth_centres() == [5.0, 15.0, 25.0, 35.0, 45.0, 55.0, 65.0, 75.0, 85.0, 95.0]
    assert fig6_cell(0, 0.0) == (0, 0)
    assert fig6_cell(499, 9.99) == (0, 0)
    assert fig6_cell(500, 10.0) == (1, 1)
    assert fig6_cell(3999, 100.0) == (7, 9)
    assert fig6_cell(4000, 50.0) is None
    assert fig6_cell(1000, float("nan")) is None


@needs_data
def test_real_depths_lie_inside_the_context():
    samples, _ = load_multihop(HF, limit=20)
    depths = [support_depth(s.spans["support"], len(s.context)) for s in samples]
    assert all(0 < d < 100 for d in depths) and len({round(d) for d in depths}) > 5
