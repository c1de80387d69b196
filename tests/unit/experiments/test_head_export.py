"""DuoAttention TSV export/import: KV-head grouping, the exact file format, and the round trip."""
import json

import numpy as np
import pytest

from dynheads.errors import ConfigError
from dynheads.experiments.dynamism import top_heads
from dynheads.experiments.head_export import export_heads, kv_full_mask, ranking_from_duo_tsv, write_duo_tsv
from dynheads.experiments.static_ranking import load_static_ranking
from dynheads.heads import HeadLayout
from dynheads.runs import RunDir
from dynheads.tasks.niah import NiahConfig

LAYOUT = HeadLayout(n_layers=2, n_heads=4, n_kv_heads=2)  # query heads 0,1 read KV head 0; 2,3 read KV head 1


def test_a_kv_head_is_full_when_any_of_its_query_heads_is_chosen():
    chosen = np.zeros((2, 4), bool)
    chosen[0, 1] = chosen[1, 2] = chosen[1, 3] = True
    np.testing.assert_array_equal(kv_full_mask(chosen, LAYOUT), [[True, False], [False, True]])


def test_tsv_is_duo_attentions_savetxt_layout_and_reads_back_per_query_head(tmp_path):
    path = tmp_path / "full_attention_heads.tsv"
    write_duo_tsv(path, np.array([[True, False], [False, True]]))
    assert path.read_text().splitlines() == ["1.000000000000000000e+00\t0.000000000000000000e+00",
                                             "0.000000000000000000e+00\t1.000000000000000000e+00"]
    gates = np.clip(np.loadtxt(path, dtype=float, delimiter="\t"), 0, 1)  # duo_attn.utils.load_attn_pattern
    np.testing.assert_array_equal(gates, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(ranking_from_duo_tsv(path, LAYOUT), [[1, 1, 0, 0], [0, 0, 1, 1]])
    path.write_text("0.7\t1.5\n-1\t0.2\n")  # trained gates: clipped to [0, 1] as DuoAttention does
    np.testing.assert_allclose(ranking_from_duo_tsv(path, LAYOUT), [[0.7, 0.7, 1, 1], [0, 0, 0.2, 0.2]])
    with pytest.raises(ConfigError, match="has 2 layers × 2 KV heads; the model has 3 × 2"):
        ranking_from_duo_tsv(path, HeadLayout(3, 4, 2))
    path.write_text("not\ta number\n")
    with pytest.raises(ConfigError, match="cannot read DuoAttention head file"):
        ranking_from_duo_tsv(path, LAYOUT)


def _run(path):
    cfg = {"kind": "niah", "layout": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
           "score": {"name": "copy_paste", "args": {"span": "needle"}}, "task": {"seed": 0}}
    run = RunDir.create(path, cfg)
    score = np.zeros((4, 2, 4), np.float32)
    score[:, 1, 3] = 1.0  # L1-H3 active at every step
    score[:3, 0, 0] = 1.0  # L0-H0 at 3 of 4 steps
    score[:1, 1, 1] = 1.0  # L1-H1 at 1 of 4 steps
    run.write_sample("niah-500-0-0", {"token_id": np.arange(4), "score": score},
                     {"order": 0, "accuracy": 1.0, "token_spans": {"needle": [[0, 2]], "answer": [[0, 2]]}})
    return run


def test_export_round_trip_from_a_run_and_import_as_static_ranking(tmp_path, tiny_lm):
    run = _run(tmp_path / "det")
    summary = export_heads(run, "duo", tmp_path / "duo", top=2, sink=16, recent=32)
    assert summary["query_heads"] == ["L0-H0", "L1-H3"] and summary["full_kv_heads"] == 2
    assert json.loads((tmp_path / "duo" / "config.json").read_text())["sink_size"] == 16
    tsv = tmp_path / "duo" / "full_attention_heads.tsv"
    np.testing.assert_array_equal(np.loadtxt(tsv, delimiter="\t"), [[1, 0], [0, 1]])
    ranking, source = load_static_ranking(str(tsv), tiny_lm, NiahConfig(), set(), NiahConfig(), tmp_path / "x")
    assert source["kind"] == "duo_tsv" and tiny_lm.layout == LAYOUT
    assert set(np.flatnonzero(top_heads(ranking, 4))) == {0, 1, 6, 7}  # both query heads of each full KV head
    export_heads(run, "duo", tmp_path / "three.tsv", top=3)  # L1-H1 joins KV head 0 of layer 1
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "three.tsv", delimiter="\t"), [[1, 0], [1, 1]])
    with pytest.raises(ConfigError, match="--top must be between 1 and 8"):
        export_heads(run, "duo", tmp_path / "bad.tsv", top=9)
    with pytest.raises(ConfigError, match="unknown --format 'razor'"):
        export_heads(run, "razor", tmp_path / "bad.tsv", top=1)


def test_retrieval_head_export_is_wu_et_al_head_scores(tmp_path):
    summary = export_heads(_run(tmp_path / "det"), "retrieval_head", tmp_path / "hs.json")
    scores = json.loads((tmp_path / "hs.json").read_text())
    assert summary["n_samples"] == 1 and len(scores) == 8
    assert scores["1-3"] == [2.0] and scores["0-0"] == [1.5] and scores["0-1"] == [0.0]  # hits / 2 answer tokens


def test_export_checks_every_argument_before_writing(tmp_path):
    run = _run(tmp_path / "det")
    with pytest.raises(ConfigError, match="--sink must be >= 0 and --recent >= 1"):
        export_heads(run, "duo", tmp_path / "duo", top=2, sink=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file is a file, so nothing can be written under it"):
        export_heads(run, "duo", tmp_path / "file" / "duo", top=2)
    assert not (tmp_path / "duo").exists()


def test_retrieval_head_export_with_no_correct_sample_is_refused(tmp_path):
    """Wu et al.'s scores average over correct answers: with none there is nothing to write (not 8 empty lists)."""
    from dynheads.errors import DataError

    run = _run(tmp_path / "det")
    row = json.loads((run.path / "samples" / "niah-500-0-0.json").read_text())
    (run.path / "samples" / "niah-500-0-0.json").write_text(json.dumps({**row, "accuracy": 0.0}))
    with pytest.raises(DataError, match="has no correctly answered sample"):
        export_heads(run, "retrieval_head", tmp_path / "scores.json")
    assert not (tmp_path / "scores.json").exists()


def test_a_ranking_run_is_named_by_its_role(tmp_path):
    """`sparse` reads its --detection run through ranking_from_run: errors say "detection run", not "static ranking"."""
    from dynheads.experiments.static_ranking import ranking_from_run

    run = RunDir.create(tmp_path / "abl", {"kind": "ablation", "layout": {}})
    with pytest.raises(ConfigError, match=f"^detection run {tmp_path / 'abl'} is not a traced detection run"):
        ranking_from_run(run, LAYOUT, NiahConfig(), set(), what="detection run")
    with pytest.raises(ConfigError, match="^static ranking "):
        ranking_from_run(run, LAYOUT, NiahConfig(), set())
