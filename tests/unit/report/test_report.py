"""Report parts without a model: Table 1 pooling, result lookup, verdict rules, reproduce's resume bookkeeping."""
import json

import numpy as np
import pytest

from dynheads.errors import ConfigError, DataError, Interrupted
from dynheads.experiments import reproduce as rep
from dynheads.experiments.dynamism import DynamismConfig, dynamism_stats
from dynheads.report import verdicts as vd
from dynheads.report.collect import pooled_stats, read_result, sample_sums


@pytest.mark.parametrize("empty", ["skip", "keep"])
def test_pooled_stats_of_all_samples_equal_dynamism_stats(empty):
    rng = np.random.default_rng(3)
    samples = [rng.random((n, 3, 4)) < 0.3 for n in (5, 1, 7, 4)]
    samples[2][1] = False  # an empty step inside a sample
    static = np.zeros((3, 4), bool)
    static[0, :3] = True
    per = [sample_sums(a.reshape(len(a), -1), static.reshape(-1), empty == "keep") for a in samples]
    got = pooled_stats(np.ones((1, len(per))), np.array([p[0] for p in per]), np.array([p[1] for p in per]))
    ids = np.concatenate([np.full(len(a), f"s{i}") for i, a in enumerate(samples)])
    want = dynamism_stats(np.concatenate(samples), ids, static, DynamismConfig(empty_steps=empty))
    for key in ("heads_per_step_mean", "jaccard_static", "adjacent_jaccard", "entropy", "heads_ever_active"):
        assert got[key][0] == pytest.approx(getattr(want, key), abs=1e-12), key
    # a resample that takes sample 0 twice and drops sample 1 weighs it twice
    twice = pooled_stats(np.array([[2.0, 0, 1, 1]]), np.array([p[0] for p in per]), np.array([p[1] for p in per]))
    dup = dynamism_stats(np.concatenate([samples[0], samples[0], samples[2], samples[3]]),
                         np.concatenate([np.full(5, "a"), np.full(5, "b"), np.full(7, "c"), np.full(4, "d")]),
                         static, DynamismConfig(empty_steps=empty))
    assert twice["adjacent_jaccard"][0] == pytest.approx(dup.adjacent_jaccard, abs=1e-12)


def test_table1_names_the_static_set_it_used_when_capped_below_20(tmp_path):
    """Only 7 heads ever score: the column and the entropy say top-7, and a note says it was capped."""
    from dataclasses import asdict

    from dynheads.experiments.dynamism import activation_frequency, top_heads
    from dynheads.report.sections import sections

    rng = np.random.default_rng(1)
    active = np.zeros((40, 3, 4), bool)
    active.reshape(40, -1)[:, :7] = rng.random((40, 7)) < 0.5  # heads 0-6 of 12 are ever active
    static = top_heads(activation_frequency(active), 20)
    stats = dynamism_stats(active, np.repeat(np.arange(10), 4), static, DynamismConfig())
    assert int(static.sum()) == 7 and stats.static_requested == 20
    data = {"out": tmp_path, "config": None, "state": {"config": {"model": "default"}, "steps": {}},
            "niah": {"samples": [{"accuracy": 1.0}] * 10, "dynamism": {"stats": asdict(stats)}, "cca": None,
                     "probes": {}, "table1_ci": None, "figures": {"fig1": None, "fig4": None}},
            "ablation": {"result": None, "figure": None}, "progressive": {"result": None, "figure": None},
            "multihop": {"result": None, "regress": None, "figure": None}, "rag": {"result": None}}
    claim1 = {s.id: s for s in sections(data)}["claim1"]
    assert claim1.tables[0].columns[3:] == ["Jaccard w/ static top-7", "adj. Jaccard", "entropy (ln 7 = 1.9459)"]
    assert claim1.notes[1] == ("note: only 7 heads have a positive static score, so the static set is capped at 7 "
                               "(asked for top-20; idle heads are never added)")


def test_read_result_accepts_parameter_named_files(tmp_path):
    (tmp_path / "results").mkdir()
    assert read_result(tmp_path, "cca") is None
    (tmp_path / "results" / "cca__max_offset=3.json").write_text('{"k": 3}')
    assert read_result(tmp_path, "cca") == {"k": 3}
    (tmp_path / "results" / "cca.json").write_text('{"k": 10}')
    assert read_result(tmp_path, "cca") == {"k": 10}
    assert read_result(tmp_path, "probe_k0") is None


def _ablation(dyn_high, excl_high, base=0.9, n=30, p=0.01):
    iv = lambda e, lo, hi: {"estimate": e, "low": lo, "high": hi, "n": n}  # noqa: E731
    return {"conditions": {"none": {"accuracy": iv(base, base - 0.1, 1.0)}, "dynamic": {"accuracy": iv(0, 0, dyn_high)}},
            "comparisons": [{"a": "dynamic", "b": "static_excluding_dynamic", "metric": "accuracy",
                             "mean_difference": -0.5, "low": -0.7, "high": excl_high, "p_value": p, "n": n}]}


def test_claim2_verdict_rules():
    data = {"state": {"steps": {}}, "ablation": {"result": _ablation(0.05, -0.3)}}
    v = vd.claim2(data)
    assert v.verdict == vd.REPRODUCED and len(v.checks) == 2
    data["ablation"]["result"] = _ablation(0.05, 0.02)
    v = vd.claim2(data)
    assert v.verdict == vd.NOT_REPRODUCED and "static_excluding_dynamic" in v.reason
    data["ablation"]["result"] = _ablation(0.05, -0.3, p=0.06)  # interval below zero, but the test does not agree
    v = vd.claim2(data)
    assert v.verdict == vd.NOT_REPRODUCED and "p = 0.06" in v.reason
    data["ablation"]["result"] = _ablation(0.05, -0.3, n=9)
    v = vd.claim2(data)
    assert (v.verdict, v.reason) == (vd.NOT_COMPARABLE, "n = 9 samples, fewer than the 10 a paired verdict needs")
    data["ablation"]["result"] = _ablation(0.05, -0.3, base=0.2)
    assert vd.claim2(data).verdict == vd.NOT_COMPARABLE
    data = {"state": {"steps": {"ablation": {"status": "skipped", "reason": "no samples"}}}, "ablation": {"result": None}}
    v = vd.claim2(data)
    assert v.verdict == vd.NOT_COMPARABLE and "no samples" in v.reason


def _niah(n_samples, entropy=2.534):
    return {"state": {"steps": {}},
            "niah": {"samples": [{"accuracy": 1.0}] * n_samples,
                     "table1_ci": {"jaccard_static": (0.2, 0.3), "adjacent_jaccard": (0.4, 0.5)},
                     "dynamism": {"stats": {"static_heads": [0] * 20, "entropy": entropy, "ln_static_top": 2.996}}}}


def test_claim1_failure_names_the_value_and_what_it_must_be():
    data = _niah(10)
    v = vd.claim1(data)
    assert v.verdict == vd.NOT_REPRODUCED and [ok for _, ok in v.checks] == [True, True, False]
    assert v.reason == ("check failed: entropy 2.534 (must be > ln 20 = 2.996: more heads share the work than the "
                        "static set holds)")
    data["niah"]["dynamism"]["stats"]["entropy"] = 3.1
    assert vd.claim1(data).verdict == vd.REPRODUCED


def test_claims_1_and_3_need_a_minimum_of_samples():
    """A 5-sample NIAH run passes every claim-1 check, but gives no verdict; claim 3 needs 100 samples."""
    v = vd.claim1(_niah(5, entropy=3.1))
    assert (v.verdict, v.reason) == (vd.NOT_COMPARABLE, "n = 5 NIAH samples, fewer than the 10 claim 1 needs")
    assert vd.claim1(_niah(10, entropy=3.1)).verdict == vd.REPRODUCED
    gap = {"gap": 0.1, "low": 0.05, "high": 0.15, "excludes_zero": True}
    offsets = [{"k": k, "heldout_top1_ci": {"low": 0.9}, "null": {"top1": 0.5}, "margin_over_persistence": gap,
                "margin_over_position": gap} for k in (0, 1)]
    data = _niah(99)
    data["niah"].update(cca={"offsets": offsets}, probes={0: {"gaps": {"position": gap}}})
    v = vd.claim3(data)
    assert (v.verdict, v.reason) == (vd.NOT_COMPARABLE, "n = 99 NIAH samples, fewer than the 100 claim 3 needs")
    data["niah"]["samples"] = [{"accuracy": 1.0}] * 100
    assert vd.claim3(data).verdict == vd.REPRODUCED


def _rag(f1_dynamic, f1_static, em_full=0.5):
    """A RAG result summarised from per-question F1s (dynamic, static, w/o RAG at 0, full context at em_full)."""
    from dynheads.experiments.rag import summarize

    q = lambda f1, em=0.0: {"em": em, "f1": f1, "n_retrievals": 1, "n_tokens": 5}  # noqa: E731
    rows = [{"strategies": {"dynamic": q(d), "static": q(s), "none": q(0.0), "full": q(1.0, em_full)}}
            for d, s in zip(f1_dynamic, f1_static)]
    return {"state": {"steps": {}}, "rag": {"result": summarize(rows, ["dynamic", "static", "none", "full"],
                                                                  np.random.default_rng(0), 500)}}


def test_rag_verdict_not_comparable_when_full_context_fails():
    iv = lambda e: {"estimate": e, "low": e, "high": e}  # noqa: E731
    strat = {n: {"em": iv(em), "f1": iv(em)} for n, em in (("dynamic", 0.0), ("static", 0.0), ("full", 0.03))}
    v = vd.rag({"state": {"steps": {}}, "rag": {"result": {"strategies": strat, "vs_static": {}}}})
    assert v.verdict == vd.NOT_COMPARABLE and "EM 0.03 even with the full context" in v.reason


def test_one_lucky_question_or_five_cannot_reproduce_dynamic_rag():
    """n = 1: interval [+0.05, +0.05] and p = 1; n = 5 all positive: p = 0.0625. Neither is a verdict."""
    one = _rag([0.55], [0.5])
    assert one["rag"]["result"]["vs_static"]["dynamic"]["f1"] == {**one["rag"]["result"]["vs_static"]["dynamic"]["f1"],
                                                                  "low": pytest.approx(0.05), "p_value": 1.0, "n": 1}
    v = vd.rag(one)
    assert (v.verdict, v.reason) == (vd.NOT_COMPARABLE, "n = 1 questions, fewer than the 10 a paired verdict needs")
    five = _rag([0.6, 0.7, 0.55, 0.8, 0.9], [0.5] * 5)
    assert five["rag"]["result"]["vs_static"]["dynamic"]["f1"]["p_value"] == pytest.approx(0.0625)
    v = vd.rag(five)
    assert (v.verdict, v.reason) == (vd.NOT_COMPARABLE, "n = 5 questions, fewer than the 10 a paired verdict needs")
    ten = _rag([0.6, 0.7, 0.52, 0.8, 0.9, 0.55, 0.65, 0.75, 0.85, 0.95], [0.5] * 10)
    v = vd.rag(ten)
    assert v.verdict == vd.REPRODUCED and "Wilcoxon p = 0.00195, n = 10" in v.checks[0][0]
    mixed = _rag([0.6, 0.4] * 5, [0.5] * 10)  # ten questions, no shift: not reproduced, reason quoted
    v = vd.rag(mixed)
    assert v.verdict == vd.NOT_REPRODUCED and v.reason.startswith("check failed: dynamic − static F1 +0.000")


def test_reproduce_resumes_and_skips_finished_steps(tmp_path, monkeypatch):
    calls = []

    def fake_steps(p, out, model):
        def work(name, fail=None):
            def run(lm):
                calls.append((name, lm))
                if fail:
                    raise fail
            return run
        return [rep.Step("a", "a", False, "cmd a", work("a")),
                rep.Step("b", "b", True, "cmd b", work("b", Interrupted("stopped") if not calls_ok else None)),
                rep.Step("c", "c", False, "cmd c", work("c", DataError("too few samples")))]

    monkeypatch.setattr(rep, "steps", fake_steps)
    loads = []
    load = lambda m: loads.append(m) or type("LM", (), {"describe": lambda self: {"source": m}})()  # noqa: E731
    calls_ok = False
    with pytest.raises(Interrupted):  # Ctrl-C in step b (the runner raises Interrupted): a is kept
        rep.reproduce("m", rep.Preset(), tmp_path, "smoke", load=load, log=lambda m: None)
    assert [c[0] for c in calls] == ["a", "b"] and loads == ["m"]
    stored = json.loads((tmp_path / rep.STATE).read_text())
    assert stored["steps"]["b"]["status"] == "interrupted" and stored["model"] == {"source": "m"}
    calls_ok = True
    state = rep.reproduce("m", rep.Preset(), tmp_path, "smoke", load=load, log=lambda m: None)
    assert [c[0] for c in calls] == ["a", "b", "b", "c"]
    assert state["steps"]["c"] == {**state["steps"]["c"], "status": "skipped", "reason": "too few samples"}
    assert json.loads((tmp_path / rep.STATE).read_text())["steps"]["b"]["status"] == "done"
    rep.reproduce("m", rep.Preset(), tmp_path, "smoke", load=load, log=lambda m: None)  # finished: nothing runs
    assert len(calls) == 4 and loads == ["m", "m"]
    with pytest.raises(ConfigError, match="niah_per_cell"):
        rep.reproduce("m", rep.preset("smoke", niah_per_cell=3), tmp_path, "smoke", load=load)
    with pytest.raises(ConfigError, match="unknown step 'z'"):
        rep.reproduce("m", rep.Preset(), tmp_path, "smoke", load=load, only=("z",))


def test_reproduce_refuses_bad_hotpotqa_slices_before_anything_runs(tmp_path, monkeypatch):
    """Overlapping slices, a named file that is missing or too short: refused before the folder or any step."""
    monkeypatch.setattr(rep, "steps", lambda p, out, model: pytest.fail("a step was built"))
    data = tmp_path / "hotpot.json"
    data.write_text(json.dumps([{"_id": str(i)} for i in range(60)]))
    out = tmp_path / "out"
    cases = [(rep.preset("smoke", hotpotqa=str(data), rag_records=(0, 40)),
              "evaluation records 0-40 overlap the detection records 30-50.*--rag-questions can be at most 30"),
             (rep.preset("smoke", hotpotqa=str(tmp_path / "nope.json")), "--hotpotqa .*nope.json does not exist"),
             (rep.preset("paper", hotpotqa=str(data)), "has 60 records; records 50-100 \\(detection\\)"),
             (rep.preset("smoke", hotpotqa=str(data), multihop_records=(30, 25)), "detection records 30-25 are empty")]
    for p, message in cases:
        with pytest.raises(ConfigError, match=message):
            rep.reproduce("m", p, out, "smoke", load=lambda m: pytest.fail("the model was loaded"))
    data.write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="is not a JSON list of HotpotQA records"):
        rep.reproduce("m", rep.preset("smoke", hotpotqa=str(data)), out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a run folder"):
        rep.reproduce("m", rep.Preset(), tmp_path / "file")
    assert not out.exists()
    # the default file (relative to the working directory) may be absent: its steps are skipped later, not refused
    monkeypatch.chdir(tmp_path)
    rep.check_hotpotqa(rep.Preset())


def test_report_refuses_a_state_file_that_is_not_a_reproduction(tmp_path):
    for text, message in (("nope", "is not JSON"), ("[1]", "is not a reproduction state"),
                          ('{"config": {"sizes": {}}, "steps": []}', "is not a reproduction state")):
        (tmp_path / rep.STATE).write_text(text)
        with pytest.raises(DataError, match=message):
            rep.read_state(tmp_path)
        with pytest.raises(DataError, match=message):  # nor resumed into
            rep.reproduce("m", rep.Preset(), tmp_path, load=lambda m: pytest.fail("the model was loaded"))


def test_sections_and_markdown_from_experiment_summaries(tmp_path):
    from dynheads.experiments.ablation import CONDITIONS, summarise
    from dynheads.experiments.rag import summarize
    from dynheads.report.html import render_html, render_md
    from dynheads.report.sections import sections

    rng = np.random.default_rng(0)
    acc = {"none": [1, 1, 1, 0], "dynamic": [0, 0, 0, 0], "static": [1, 0, 1, 0],
           "static_excluding_dynamic": [1, 1, 0, 1], "random": [1, 1, 1, 1]}
    per = {c: {"accuracy": np.array(acc[c], float), "rouge_l": np.array(acc[c], float) / 2,
               "heads_masked_per_step": np.full(4, 1.5), "overlap_per_step": np.full(4, 0.5)} for c in CONDITIONS}
    ablation = {**summarise(per, rng, 200), "n_samples": 4, "matched_heads_mean": 1.5}
    q = lambda em, f1: {"em": em, "f1": f1, "n_retrievals": 1, "n_tokens": 5, "support_coverage": 0.5,  # noqa: E731
                        "opened_fraction": 0.2}
    rows = [{"strategies": {"dynamic": q(1, 1.0), "static": q(0, 0.5), "none": q(0, 0.0), "full": q(1, 1.0)}},
            {"strategies": {"dynamic": q(0, 0.4), "static": q(0, 0.2), "none": q(0, 0.1), "full": q(1, 0.9)}}]
    rag = summarize(rows, ["dynamic", "static", "none", "full"], rng, 200)
    data = {"out": tmp_path, "config": {"model": {"path": "/m/SmolLM2.gguf", "fingerprint": "ab" * 32},
                                        "versions": {"torch": "2.13.0"}},
            "state": {"config": {"model": "default", "preset": "smoke"}, "created": "t",
                      "steps": {"ablation": {"status": "done", "wall_s": 12.0, "command": "dynheads ablate …"},
                                "cca": {"status": "skipped", "reason": "too few samples", "wall_s": 0.1}}},
            "niah": {"samples": [], "dynamism": None, "cca": None, "probes": {}, "table1_ci": None,
                     "figures": {"fig1": None, "fig4": None}},
            "ablation": {"result": ablation, "figure": None}, "progressive": {"result": None, "figure": None},
            "multihop": {"result": None, "regress": None, "figure": None}, "rag": {"result": rag}}
    secs = {s.id: s for s in sections(data)}
    assert [r[0] for r in secs["claim2"].tables[0].rows] == list(CONDITIONS)
    assert secs["claim2"].tables[0].rows[1][1] == "0.00 [0.00, 0.00]"
    assert secs["table4"].tables[0].rows[0][:2] == ["Dynamic", "0.456 / 0.5586"]
    assert secs["fig4"].notes == ["Not comparable — step 'cca' was skipped: too few samples."]
    v = {x.claim: x for x in vd.all_verdicts(data)}
    # dynamic 0 and both gaps below 0, but on 4 samples; F1 gaps +0.5 and +0.2, but on 2 questions: no verdict
    assert v["Claim 2 (irreplaceability, Fig. 2)"].reason == "n = 4 samples, fewer than the 10 a paired verdict needs"
    assert v["Dynamic RAG (Table 4)"].reason == "n = 2 questions, fewer than the 10 a paired verdict needs"
    assert v["Claim 2 (irreplaceability, Fig. 2)"].verdict == v["Dynamic RAG (Table 4)"].verdict == vd.NOT_COMPARABLE
    assert v["Claim 3 (correlation, Fig. 4, Table 2)"].verdict == vd.NOT_COMPARABLE
    md, page = render_md(data, list(v.values()), list(secs.values())), render_html(data, list(v.values()),
                                                                                  list(secs.values()))
    assert "| Dynamic | 0.456 / 0.5586 |" in md and "sha256: " + "ab" * 32 in md
    assert page.count("<table>") == sum(len(s.tables) for s in secs.values()) + 2  # + verdicts, provenance


def test_comparison_tables_put_models_side_by_side():
    from dynheads.experiments.ablation import CONDITIONS, summarise
    from dynheads.report.compare import comparison_tables

    def data(model, dyn_acc):
        acc = {"none": [1] * 12, "dynamic": dyn_acc, "static": [1, 0] * 6, "static_excluding_dynamic": [1] * 12,
               "random": [1] * 12}
        per = {c: {"accuracy": np.array(acc[c], float), "rouge_l": np.array(acc[c], float),
                   "heads_masked_per_step": np.full(12, 1.0), "overlap_per_step": np.full(12, 0.5)} for c in CONDITIONS}
        return {"state": {"config": {"model": model}, "steps": {}},
                "niah": {"samples": [], "dynamism": None, "cca": None, "probes": {}, "table1_ci": None},
                "ablation": {"result": {**summarise(per, np.random.default_rng(0), 200), "n_samples": 12}},
                "rag": {"result": None}}

    # 12 pairs: above the paired verdicts' minimum, so each model gets a real verdict
    datas = [data("default", [0] * 12), data("gemma3-270m", [1] * 12)]
    names = ["default", "gemma3-270m"]
    verdicts = {n: vd.all_verdicts(d) for n, d in zip(names, datas)}
    tables = comparison_tables(datas, names, verdicts)
    claim2 = tables[1]
    assert claim2.columns == ["statistic", "paper (llama3.1-8b)", "default", "gemma3-270m"]
    rows = {r[0]: r for r in claim2.rows}
    assert rows["accuracy, dynamic masked"][1:] == ["≈ 0", "0.00 [0.00, 0.00]", "1.00 [1.00, 1.00]"]
    assert rows["verdict"][2].startswith(verdicts["default"][1].verdict)
    assert rows["verdict"][3].startswith("not reproduced")  # masking D_t changed nothing on the second "model"
    assert tables[0].rows == [["verdict", "–"] + [f"{v[0].verdict}: {v[0].reason}" for v in verdicts.values()]]
