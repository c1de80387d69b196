"""Multi-needle NIAH samples: hand-derived insertion and depths, exact spans on the default tokenizer, scoring."""
import json
from dataclasses import asdict

import pytest

from dynheads.errors import ConfigError
from dynheads.tasks.base import Sample
from dynheads.tasks.multineedle import (KEYS, MultiNiahConfig, insert_needles, needle_depths, niah_config,
                                        score_multi_response)
from dynheads.tasks.niah import NIAH_PROMPT, NiahConfig, insert_needle, niah_samples

TEXT = "One two. Three four five. Six seven."  # sentence ends at characters 9, 26 and 36


def test_insert_needles_snaps_each_needle_and_keeps_single_needle_behaviour():
    # 60% of 36 chars = 22 → back to 9; 0% → 0; 100% → 36; two needles at one point keep index order
    assert insert_needles(TEXT, ["A.", "B."], [60, 0]) == ("B. One two. A. Three four five. Six seven.", [12, 0])
    assert insert_needles(TEXT, ["A.", "B.", "C."], [60, 0, 100]) == (
        "B. One two. A. Three four five. Six seven. C.", [12, 0, 43])
    assert insert_needles(TEXT, ["A.", "B."], [60, 60]) == ("One two. A. B. Three four five. Six seven.", [9, 12])
    for depth in (0, 30, 60, 100):
        out, at = insert_needle(TEXT, "N.", depth)
        assert insert_needles(TEXT, ["N."], [depth]) == (out, [at])


def test_needle_depths_spread_evenly_and_wrap():
    assert needle_depths(0, 2) == (0.0, 50.0)
    assert needle_depths(100, 2) == (100.0, 50.0)
    assert needle_depths(50, 4) == (50.0, 75.0, 0.0, 25.0)


def test_one_needle_keeps_the_single_needle_config_and_bad_options_are_config_errors():
    cfg = niah_config(1, None, lengths=(300,), depths=(50,))
    assert type(cfg) is NiahConfig and asdict(cfg) == asdict(NiahConfig(lengths=(300,), depths=(50,)))
    assert niah_config(3, None) == MultiNiahConfig(num_needles=3, mode="multikey")
    with pytest.raises(ConfigError, match="--mode needs --num-needles"):
        niah_config(1, "multivalue")
    with pytest.raises(ConfigError, match="at least 1"):
        niah_config(0, None)


@pytest.fixture(scope="module")
def tokenizer(default_lm):
    return default_lm.tokenizer


def _decoded(tokenizer, enc, name):
    return [tokenizer.decode(enc.input_ids[s:e]).strip() for s, e in enc.token_spans[name]]


def test_multikey_samples_have_exact_spans_one_queried_needle_and_spread_depths(tokenizer):
    cfg = MultiNiahConfig(lengths=(400,), depths=(0, 50), samples_per_cell=1, seed=1, num_needles=3)
    samples = list(niah_samples(tokenizer, cfg, max_positions=8192))
    assert [s.sample.id for s in samples] == ["niah3mk-400-0-0", "niah3mk-400-50-0"]
    for enc, depth in zip(samples, (0, 50)):
        meta = enc.sample.metadata
        assert 390 <= enc.prompt_len == meta["prompt_tokens"] <= 400 and meta["depths"] == list(needle_depths(depth, 3)) and meta["queried"] == [0]
        texts = meta["needles"]
        assert [_decoded(tokenizer, enc, f"needle_{i}") for i in range(3)] == [[t] for t in texts]
        assert enc.token_spans["needle"] == enc.token_spans["needle_0"] and enc.token_spans["answer"] == enc.token_spans["value_0"]
        assert enc.sample.answer == meta["values"][0]
        assert [v in _decoded(tokenizer, enc, f"value_{i}")[0] for i, v in enumerate(meta["values"])] == [True] * 3
        keys = [t.split(" for ")[1].split(" is ")[0] for t in texts]
        assert len(set(keys)) == 3 and set(keys) <= set(KEYS) and enc.sample.question == f"What is the magic word for {keys[0]}?"
        assert len(set(meta["values"])) == 3 and all(len(v) == 36 for v in meta["values"])
        starts = [enc.token_spans[f"needle_{i}"][0][0] for i in range(3)]
        assert sorted(range(3), key=lambda i: starts[i]) == sorted(range(3), key=lambda i: meta["depths"][i])
    again = list(niah_samples(tokenizer, cfg, max_positions=8192))
    assert [e.input_ids for e in again] == [e.input_ids for e in samples]  # seeded


def test_multivalue_samples_share_one_key_and_ask_for_every_value(tokenizer):
    cfg = MultiNiahConfig(lengths=(400,), depths=(100,), samples_per_cell=1, num_needles=2, mode="multivalue")
    (enc,) = niah_samples(tokenizer, cfg)
    meta = enc.sample.metadata
    assert enc.sample.id == "niah2mv-400-100-0" and meta["queried"] == [0, 1] and enc.sample.answer == meta["values"]
    key = meta["needles"][0].split(" for ")[1].split(" is ")[0]
    assert all(t.startswith(f"One of the magic words for {key} is ") for t in meta["needles"])
    assert enc.sample.question == f"What are all the magic words for {key}?"
    assert sorted(enc.token_spans["needle"]) == sorted(enc.token_spans["needle_0"] + enc.token_spans["needle_1"])
    assert sorted(_decoded(tokenizer, enc, "needle")) == sorted(meta["needles"])


def test_needle_file_rows_and_bad_multi_needle_grids(tokenizer, tmp_path):
    rows = [{"needle": f"The code of room {i} is {w}.", "question": f"What is the code of room {i}?", "real_needle": w}
            for i, w in enumerate(["alpha", "bravo", "charlie"])]
    path = tmp_path / "n.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = MultiNiahConfig(lengths=(300,), depths=(50,), samples_per_cell=2, needles=str(path), mode="multivalue")
    first, second = niah_samples(tokenizer, cfg)
    assert first.sample.answer == ["alpha", "bravo"] and second.sample.answer == ["charlie", "alpha"]
    assert first.sample.question == "What is the code of room 0? What is the code of room 1?"
    with pytest.raises(ConfigError, match="more than the 3 distinct needles"):
        next(niah_samples(tokenizer, MultiNiahConfig(lengths=(300,), needles=str(path), num_needles=4)))
    with pytest.raises(ConfigError, match="unknown --mode 'multiquery'"):
        next(niah_samples(tokenizer, MultiNiahConfig(lengths=(300,), mode="multiquery")))
    with pytest.raises(ConfigError, match=f"more than the {len(KEYS)} distinct keys"):
        next(niah_samples(tokenizer, MultiNiahConfig(lengths=(300,), num_needles=len(KEYS) + 1)))


def test_multi_needle_scoring_is_per_value_recall():
    meta = {"values": ["aa-1", "bb-2", "cc-3"], "queried": [0, 1, 2]}
    sample = Sample("s", "", "q", ["aa-1", "bb-2", "cc-3"], {}, NIAH_PROMPT, metadata=meta)
    out = score_multi_response("They are AA-1 and cc-3.", sample)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["needle_found"] == [1.0, 0.0, 1.0]
    key = Sample("s", "", "q", "aa-1", {}, NIAH_PROMPT, metadata={**meta, "queried": [0]})
    out = score_multi_response("It is bb-2.", key)  # a distractor's value is not the answer
    assert out["accuracy"] == 0.0 and out["needle_found"] == [0.0, 1.0, 0.0]
