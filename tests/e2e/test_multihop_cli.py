"""Multi-hop QA and Dynamic RAG through the CLI on the default model and shared HotpotQA records.

To keep prompts short, each record keeps only its supporting paragraphs (the distractors are dropped);
records 0-1 are the detection run, records 2-3 the evaluated questions (the static ranking and the
regressor must come from other questions than the ones evaluated).
"""
import json

import numpy as np
import pytest

from e2e.helpers import assert_one_line_error, dynheads, support_only

pytestmark = pytest.mark.e2e
HOTPOT = "hotpotqa/hotpotqa_dev_distractor_first100_hf.json"
CORPUS = "corpus/shared_qa_paragraphs.jsonl"
RAG_FAST = ["--prompt", "short", "--max-new-tokens", "6", "--max-sentence-tokens", "6", "--quiet"]


@pytest.fixture(scope="module")
def files(shared_data, tmp_path_factory):
    records = json.loads((shared_data / HOTPOT).read_text())
    root = tmp_path_factory.mktemp("multihop")
    (root / "detect.json").write_text(json.dumps([support_only(r) for r in records[:2]]))
    (root / "eval.json").write_text(json.dumps([support_only(r) for r in records[2:4]]))
    return root


@pytest.fixture(scope="module")
def multihop_run(files):
    out = files / "mh"
    proc = dynheads("--threads", "1", "multihop", "--data", files / "detect.json", "--limit", "2", "--max-new-tokens", "5",
                    "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_multihop_run_has_eq2_scores_em_f1_and_the_fig6_grid(multihop_run):
    out, proc = multihop_run
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "2 samples: EM" in proc.stdout and "ctx tokens" in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "multihop" and cfg["score"] == {"name": "reasoning", "args": {"span": "support"}}
    from dynheads.records import load_records
    from dynheads.scores.reasoning import reasoning_score

    rec = load_records(out)
    np.testing.assert_array_equal(rec.array("score"), reasoning_score(rec.array("mass_support"), rec.array("context_mass")))
    assert rec.array("score").shape[1:] == (30, 9) and rec.hidden().shape[1] == 576
    samples = [json.loads(p.read_text()) for p in sorted((out / "samples").glob("*.json"))]
    for s in samples:
        assert s["accuracy"] == s["em"] and 0 <= s["f1"] <= 1 and s["context_length"] > 0 and 0 <= s["support_depth"] <= 100
    summary = json.loads((out / "results" / "multihop.json").read_text())
    assert summary["load_report"]["n_missing_support"] == 0 and summary["load_report"]["format"] == "hotpotqa_hf"
    assert sum(map(sum, summary["fig6"]["n"])) + summary["fig6"]["n_outside"] == 2
    assert summary["f1"] == pytest.approx(np.mean([s["f1"] for s in samples]))
    assert (out / "figures" / "fig6_f1.png").stat().st_size > 5_000


def test_dynamism_works_on_a_multihop_run(multihop_run):
    out, _ = multihop_run
    proc = dynheads("dynamism", out)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "results" / "dynamism.json").read_text())["stats"]
    from dynheads.records import load_records

    active = load_records(out).array("score") >= 0.1  # the reasoning score's threshold
    assert stats["heads_per_step_mean"] == pytest.approx(active.reshape(len(active), -1).sum(1).mean())
    assert stats["n_steps"] == len(active) and (out / "figures" / "dynamism_heatmap.png").exists()


def test_rag_static_and_none_share_a_prefill_and_are_compared(multihop_run, files):
    ranking_run, _ = multihop_run
    out = files / "rag"
    proc = dynheads("--threads", "1", "rag", "--data", files / "eval.json", "--limit", "2", "--heads", "static,none",
                    "--static-ranking", ranking_run, "--rind-threshold", "0", *RAG_FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "paper llama3.1-8b" in proc.stdout and "0.456/0.5586" in proc.stdout and "none - static" in proc.stdout
    result = json.loads((out / "results" / "rag.json").read_text())
    assert result["n_questions"] == 2 and set(result["strategies"]) == {"static", "none"}
    none, static = result["strategies"]["none"], result["strategies"]["static"]
    assert none["retrievals_per_question"] == 0 and none["support_coverage"] == 0.0
    assert static["retrievals_per_question"] >= 1 and 0 <= static["support_coverage"] <= 1  # θ = 0: RIND fires
    assert {"mean_difference", "p_value", "low", "high"} <= set(result["vs_static"]["none"]["f1"])
    from dynheads.records import load_records

    mean_score = load_records(ranking_run).array("score").mean(0).reshape(-1)
    top5 = sorted(np.lexsort((np.arange(mean_score.size), -mean_score))[:5].tolist())
    for path in (out / "samples").glob("*.json"):
        per = json.loads(path.read_text())["strategies"]
        assert per["static"]["retrievals"] and all(r["heads"] == top5 for r in per["static"]["retrievals"])
        assert per["none"]["retrievals"] == [] and per["none"]["n_tokens"] >= 1
        npz = np.load(out / "records" / path.with_suffix(".npz").name)
        assert npz["none__mass_context"].size and (npz["none__mass_context"] == 0).all()  # hidden context


def test_rag_with_a_bm25_corpus(multihop_run, files, shared_data, monkeypatch):
    monkeypatch.setenv("DYNHEADS_CACHE", str(files / "cache"))
    out = files / "rag_corpus"
    proc = dynheads("--threads", "1", "rag", "--data", files / "eval.json", "--limit", "1", "--heads", "static", "--retrieval", "corpus",
                    "--corpus", shared_data / CORPUS, "--static-ranking", multihop_run[0], "--rind-threshold", "0",
                    *RAG_FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "11904 documents indexed" in proc.stdout
    (sample,) = [json.loads(p.read_text()) for p in (out / "samples").glob("*.json")]
    retrievals = sample["strategies"]["static"]["retrievals"]
    assert retrievals and all(r["query"] and r["passages"] and r["windows"] == [] for r in retrievals)
    assert json.loads((out / "results" / "rag.json").read_text())["n_docs"] == 11904


@pytest.mark.parametrize("case", ["malformed", "unknown_format", "not_jsonl_corpus", "nothing_usable",
                                  "ranking_overlap"])
def test_bad_input_is_a_one_line_error(case, files, multihop_run, shared_data, tmp_path):
    data = files / "eval.json"
    if case == "malformed":
        (tmp_path / "bad.json").write_text(json.dumps([{"context": {"title": [], "sentences": []}}]))
        proc = dynheads("multihop", "--data", tmp_path / "bad.json", "--out", tmp_path / "r")
        assert_one_line_error(proc, "bad.json", "record 0")
    elif case == "unknown_format":
        proc = dynheads("rag", "--data", data, "--format", "squad", "--heads", "none", "--out", tmp_path / "r")
        assert_one_line_error(proc, "eval.json", "unknown format 'squad'")
    elif case == "not_jsonl_corpus":
        proc = dynheads("rag", "--data", data, "--heads", "none", "--retrieval", "corpus", "--corpus",
                        shared_data / "corpus/2wikimultihopqa_corpus_hipporag.json", "--out", tmp_path / "r")
        assert_one_line_error(proc, "2wikimultihopqa_corpus_hipporag.json", "line 1", "JSONL")
    elif case == "nothing_usable":
        record = json.loads(data.read_text())[0]
        record["supporting_facts"] = {"title": ["No Such Page"], "sent_id": [0]}
        (tmp_path / "gone.json").write_text(json.dumps([record]))
        proc = dynheads("multihop", "--data", tmp_path / "gone.json", "--out", tmp_path / "r")
        assert_one_line_error(proc, "gone.json", "no usable records", "1 of 1 skipped")
    elif case == "ranking_overlap":
        proc = dynheads("rag", "--data", files / "detect.json", "--limit", "2", "--heads", "static,oracle",
                        "--out", tmp_path / "r")
        assert_one_line_error(proc, "unknown head strategy 'oracle'")
        proc = dynheads("rag", "--data", files / "detect.json", "--limit", "2", "--heads", "static",
                        "--static-ranking", multihop_run[0], "--out", tmp_path / "r")
        assert_one_line_error(proc, "computed on 2 of the evaluated questions")
