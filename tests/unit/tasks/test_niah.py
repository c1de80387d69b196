"""NIAH construction on the default model's tokenizer: exact lengths, exact needle spans, seeds."""
import json

import pytest

from dynheads.errors import ConfigError, DataError
from dynheads.tasks.base import encode, get_task
from dynheads.tasks.niah import NiahConfig, insert_needle, load_haystack, load_needles, niah_samples


def test_insert_needle_moves_back_to_a_sentence_end():
    text = "One two. Three four five. Six seven."
    assert insert_needle(text, "N.", 0) == ("N. " + text, 0)
    out, at = insert_needle(text, "N.", 60)  # 60% falls inside the second sentence
    assert out == "One two. N. Three four five. Six seven." and at == 9
    out, at = insert_needle(text, "N.", 100)  # after the last sentence end
    assert out == text + " N." and out[at:] == "N."


@pytest.fixture(scope="module")
def tokenizer(default_lm):
    return default_lm.tokenizer


def test_prompts_have_exact_length_and_exact_needle_span(tokenizer):
    cfg = NiahConfig(lengths=(300, 700), depths=(0, 50, 100), samples_per_cell=1, seed=3)
    samples = list(niah_samples(tokenizer, cfg, max_positions=8192))
    assert [s.sample.id for s in samples][:3] == ["niah-300-0-0", "niah-300-50-0", "niah-300-100-0"]
    starts = []
    for enc in samples:
        assert enc.prompt_len == enc.sample.metadata["length"]
        (s, e), = enc.token_spans["needle"]
        assert tokenizer.decode(enc.input_ids[s:e]).strip() == enc.sample.metadata["needle"]
        (a, b), = enc.token_spans["answer"]
        assert enc.sample.answer in tokenizer.decode(enc.input_ids[a:b])
        c0, c1 = enc.context_tokens
        assert not set(enc.input_ids[c0:c1]) & set(tokenizer.all_special_ids)  # no stray BOS or template tokens
        starts.append(s)
    assert starts[0] < starts[1] < starts[2] and starts[3] < starts[4] < starts[5]


def test_uuid_needles_are_seeded(tokenizer):
    cfg = NiahConfig(lengths=(300,), depths=(50,), samples_per_cell=2, seed=7)
    a = [s.sample.answer for s in niah_samples(tokenizer, cfg)]
    b = [s.sample.answer for s in niah_samples(tokenizer, cfg)]
    c = [s.sample.answer for s in niah_samples(tokenizer, NiahConfig(lengths=(300,), depths=(50,),
                                                                     samples_per_cell=2, seed=8))]
    assert a == b and a != c and a[0] != a[1] and len(a[0]) == 36


def test_paul_graham_haystack_and_retrieval_head_needles(tokenizer, shared_data):
    needles = load_needles(str(shared_data / "niah/retrieval_head/needles.jsonl"))
    assert len(needles) == 3 and all(n.answer.lower() in n.text.lower() for n in needles)
    cfg = NiahConfig(lengths=(400,), depths=(50,), samples_per_cell=3,
                     haystack=str(shared_data / "niah/PaulGrahamEssays"),
                     needles=str(shared_data / "niah/retrieval_head/needles.jsonl"))
    samples = list(niah_samples(tokenizer, cfg))
    assert [s.sample.answer for s in samples] == [n.answer for n in needles]
    assert all(s.prompt_len == 400 for s in samples)


def test_the_registered_task_builds_the_grid_and_names_its_score_span_and_metric(tokenizer, tmp_path):
    task = get_task("niah")
    assert (task.name, task.score, task.span, task.config) == ("niah", "copy_paste", "needle", NiahConfig)
    cfg = NiahConfig(lengths=(300,), depths=(50,), samples_per_cell=2, seed=7)
    assert [e.input_ids for e in task.samples(tokenizer, cfg, 8192)] == [e.input_ids for e in niah_samples(tokenizer, cfg)]
    enc = next(iter(task.samples(tokenizer, cfg, 8192)))
    assert task.metric(f"It is {enc.sample.answer}.", enc.sample)["accuracy"] == 1.0
    assert task.metric("no idea", enc.sample)["accuracy"] == 0.0
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "a.txt").write_text("Some prose sentence here. " * 30)
    resolved, inputs = task.inputs(NiahConfig(haystack=str(tmp_path / "hay" / ".." / "hay")))
    assert resolved.haystack == str((tmp_path / "hay").resolve()) and inputs["needles"] is None
    assert inputs["haystack"]["path"] == resolved.haystack and len(inputs["haystack"]["sha256"]) == 64
    task.check(cfg)
    for bad, message in ((NiahConfig(depths=(101,)), "depth 101 is outside 0-100"),
                         (NiahConfig(lengths=()), "the NIAH grid is empty"),
                         (NiahConfig(haystack=str(tmp_path / "nothing")), "does not exist")):
        with pytest.raises((ConfigError, DataError), match=message):
            task.check(bad)


def test_bad_inputs_are_one_line_errors(tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable text"):
        load_haystack(str(tmp_path / "empty"))
    bad = tmp_path / "needles.jsonl"
    bad.write_text('{"needle": "The cat sat.", "question": "Who sat?", "real_needle": "the dog"}\n')
    with pytest.raises(DataError, match="line 1"):
        load_needles(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(DataError, match="line 1"):
        load_needles(str(bad))
    with pytest.raises(ConfigError, match="above the model's maximum"):
        next(niah_samples(tokenizer, NiahConfig(lengths=(9000,)), max_positions=8192))
    with pytest.raises(ConfigError, match="empty"):
        next(niah_samples(tokenizer, NiahConfig(lengths=())))


def test_a_span_lost_in_tokenisation_is_a_data_error(tokenizer):
    from dynheads.tasks.base import Sample
    from dynheads.tasks.niah import NIAH_PROMPT

    sample = Sample("s1", "Some context here.", "Q?", "x", {"needle": [(5, 5)]}, NIAH_PROMPT)
    with pytest.raises(DataError, match="sample s1: span 'needle' not found"):
        encode(sample, tokenizer)
