"""Ablation experiment cores: compensation on hand-made arrays, summaries, static rankings, tiny-model samples."""
import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from dynheads.analyses.rankings import ranking_from_head_scores, ranking_from_run
from dynheads.errors import ConfigError
from dynheads.heads import HeadLayout
from dynheads.runners import ablation as abl
from dynheads.runners import progressive as prog
from dynheads.runs import RunDir
from dynheads.scores.base import HeadScore
from dynheads.scores.copy_paste import copy_paste_score
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample
from dynheads.tasks.niah import NiahConfig
from dynheads.tracing.tracer import TraceConfig, Tracer

L, H = 2, 3
SPANS = {"needle": [(10, 13)]}


def _compensation_arrays():
    """Three steps of one sample; heads are flat indices 0..5. Needle positions 10..12."""
    T = 3
    arr = {k: np.zeros((T, L, H), np.int64) for k in ("top1_pos", "top1_token", "masked_top1_pos", "masked_top1_token")}
    arr["token_id"] = np.array([7, 8, 9])  # kept (masked) tokens
    arr["clean_token_id"] = np.array([7, 5, 9])  # clean pass token differs at step 1
    arr["ablated"] = np.zeros((T, L, H), bool)

    def hit(name, t, flat, token, pos=11):
        arr[f"{name}top1_pos"][t].flat[flat] = pos
        arr[f"{name}top1_token"][t].flat[flat] = token

    # step 0: before {0}; after {0, 1, 2}; head 2 was masked → E_0 = {1} (or {1, 2} with masked heads)
    hit("", 0, 0, 7), hit("masked_", 0, 0, 7), hit("masked_", 0, 1, 7), hit("masked_", 0, 2, 7)
    arr["ablated"][0].flat[2] = True
    # step 1: before {3} (clean token 5); after {3, 4, 5} with the kept token 8 → E_1 = {4, 5};
    # head 3 attends to token 8 after masking, so it is in H' too but also in H → not compensated
    hit("", 1, 3, 5), hit("masked_", 1, 3, 8), hit("masked_", 1, 4, 8), hit("masked_", 1, 5, 8)
    # head 1 points at token 8 outside the needle → not retrieving
    hit("masked_", 1, 1, 8, pos=20)
    # step 2: nothing retrieves after masking → E_2 = {}
    hit("", 2, 0, 9)
    return arr


def test_compensated_heads_and_m_s_by_hand():
    arr = _compensation_arrays()
    comp = prog.compensated_heads(arr, SPANS)
    assert [np.flatnonzero(c).tolist() for c in comp] == [[1], [4, 5], []]
    with_masked = prog.compensated_heads(arr, SPANS, exclude_ablated=False)
    assert np.flatnonzero(with_masked[0]).tolist() == [1, 2]
    static = np.zeros((L, H), bool)
    static.flat[[1, 2, 4]] = True
    # |E_t ∩ static| = 1, 1, 0 → m_s = 1; counting masked heads: 2, 1, 0 → 2
    assert prog.max_static_compensation(comp, static) == 1
    assert prog.max_static_compensation(with_masked, static) == 2
    static.flat[5] = True
    assert prog.max_static_compensation(comp, static) == 2
    empty = {k: v[:0] for k, v in arr.items()}
    assert prog.max_static_compensation(prog.compensated_heads(empty, SPANS), static) == 0


def test_matched_count_is_the_run_mean_and_never_zero_where_heads_were_masked():
    # sample a masked one head at one of three steps: the old per-sample rounding gave round(0.33) = 0,
    # so its baselines masked nothing and equalled the unmasked run
    a, b = [0, 0, 1], [3, 3, 2, 2]
    assert abl.matched_heads([a]) == 1  # 0.33 → at least 1, because the dynamic condition masked a head
    assert abl.matched_heads([a, b]) == 2  # the run: (0+0+1+3+3+2+2) / 7 = 1.57 → 2, for both samples
    assert abl.matched_heads([[0, 1, 1, 1], [1, 1, 1, 1]]) == 1  # 7 / 8 = 0.875 → 1
    # pooled over steps, not a mean of per-sample means: 7 / 9 = 0.78 → 1 (per-sample means 0.14, 3 → 1.57)
    assert abl.matched_heads([[0, 0, 0, 0, 0, 0, 1], [3, 3]]) == 1
    assert abl.matched_heads([[0, 0], []]) == 0 and abl.matched_heads([]) == 0  # nothing masked anywhere
    info = abl.matching_summary([a, b], abl.AblationConfig())
    assert info["heads"] == 2 and info["mean_per_step"] == pytest.approx(11 / 7) and info["n_steps"] == 7
    assert info["condition"] == "dynamic" and "rounded half up" in info["rule"]
    unmasked = abl.AblationConfig(match="unmasked")
    assert abl.MATCH["unmasked"] == ("none", "dynamic") and unmasked.two_pass
    assert not abl.AblationConfig(match="step").two_pass and not abl.AblationConfig(match_scope="sample").two_pass
    with pytest.raises(ConfigError, match="unknown --match-scope"):
        abl.AblationConfig(match_scope="cell")


def test_summarise_reports_cis_and_paired_differences():
    per_sample = {
        "dynamic": {"accuracy": np.array([0.0, 0.0, 0.0, 1.0]), "rouge_l": np.array([0.1, 0.2, 0.0, 0.9]),
                    "overlap_per_step": np.array([2.0, np.nan, 4.0, 0.0])},
        "static": {"accuracy": np.array([1.0, 1.0, 0.0, 1.0]), "rouge_l": np.array([0.9, 0.8, 0.5, 0.9]),
                   "overlap_per_step": np.array([1.0, 1.0, 1.0, 1.0])},
    }
    out = abl.summarise(per_sample, np.random.default_rng(0), n_boot=500, comparisons=(("dynamic", "static"),))
    acc = out["conditions"]["dynamic"]["accuracy"]
    assert acc["estimate"] == 0.25 and 0.0 <= acc["low"] <= 0.25 <= acc["high"] <= 1.0 and acc["n"] == 4
    assert out["conditions"]["dynamic"]["overlap_per_step"] == 2.0  # nan (no steps) left out
    diff = {t["metric"]: t for t in out["comparisons"]}
    assert diff["accuracy"]["mean_difference"] == -0.5 and diff["accuracy"]["n_nonzero"] == 2
    assert diff["rouge_l"]["mean_difference"] == pytest.approx(-0.475)
    assert diff["rouge_l"]["high"] < 0


def test_cell_means_put_depth_on_rows_and_length_on_columns():
    lengths, depths = np.array([500, 500, 1000, 1000, 500]), np.array([0.0, 50.0, 0.0, 50.0, 0.0])
    ls, ds, grid = abl.cell_means(lengths, depths, np.array([1.0, 0.0, 0.5, 1.0, 0.0]))
    assert ls == [500, 1000] and ds == [0.0, 50.0]
    np.testing.assert_array_equal(grid, [[0.5, 0.5], [0.0, 1.0]])


def test_check_ks_and_progressive_depths():
    prog.check_ks((0, 5, 6), 6)
    with pytest.raises(ConfigError, match="k = 7 is outside 0..6"):
        prog.check_ks((0, 7), 6)
    with pytest.raises(ConfigError, match="k = -1"):
        prog.check_ks((-1,), 6)
    assert prog.progressive_niah(2000, 5, 0).depths == (0.0, 25.0, 50.0, 75.0, 100.0)
    assert prog.progressive_niah(2000, 1, 0).depths == (0.0,)
    with pytest.raises(ConfigError):
        abl.AblationConfig(match="median")
    with pytest.raises(ConfigError, match="unknown ablation method 'knockout'"):
        abl.AblationConfig(method="knockout")


def test_head_score_ranking_must_fit_the_model(tmp_path):
    layout = HeadLayout(2, 3, 1)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({f"{l}-{h}": [l + h / 10, 0.0] for l in range(2) for h in range(3)}))
    np.testing.assert_allclose(ranking_from_head_scores(good, layout), [[0.0, 0.05, 0.1], [0.5, 0.55, 0.6]])
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"0-0": [1.0], "0-1": [0.5]}))
    with pytest.raises(ConfigError, match="covers 1 layers × 2 heads; the model has 2 × 3"):
        ranking_from_head_scores(small, layout)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"5-0": [1.0]}))
    with pytest.raises(ConfigError, match="does not exist in a model with 2 layers"):
        ranking_from_head_scores(big, layout)


def _detection_run(path, seed, layout=HeadLayout(2, 3, 1)):
    cfg = {"kind": "niah", "layout": {"n_layers": layout.n_layers, "n_heads": layout.n_heads, "n_kv_heads": 1},
           "score": {"name": "copy_paste", "args": {}}, "task": {"seed": seed, "haystack": None, "needles": None}}
    run = RunDir.create(path, cfg)
    score = np.zeros((4, layout.n_layers, layout.n_heads), np.float32)
    score[:, 0, 1] = 1.0
    score[:2, 1, 2] = 1.0
    run.write_sample("niah-500-0-0", {"token_id": np.arange(4), "score": score}, {"order": 0})
    return run


def test_run_ranking_is_activation_frequency_and_never_the_same_samples(tmp_path):
    layout = HeadLayout(2, 3, 1)
    run = _detection_run(tmp_path / "det", seed=1)
    ranking, source = ranking_from_run(run, layout, NiahConfig(seed=0), {"niah-500-0-0"})
    np.testing.assert_allclose(ranking, [[0, 1, 0], [0, 0, 0.5]])
    assert source["kind"] == "run" and source["n_steps"] == 4
    with pytest.raises(ConfigError, match="same samples"):
        ranking_from_run(run, layout, NiahConfig(seed=1), {"niah-500-0-0"})
    ranking_from_run(run, layout, NiahConfig(seed=1), {"niah-1000-0-0"})  # same seed, other samples: fine
    with pytest.raises(ConfigError, match="has 2 layers × 3 heads; the model has 2 × 4"):
        ranking_from_run(run, HeadLayout(2, 4, 1), NiahConfig(seed=0), set())


# --- tiny-model samples ------------------------------------------------------------------------
PROMPT_LEN = 40


def _encoded(seed=3):
    ids = torch.randint(3, 97, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()
    sample = Sample("tiny-0", "ctx", "q?", "zzz", {}, PromptFormat(None, "{context}"),
                    metadata={"length": PROMPT_LEN, "depth": 50.0})
    return EncodedSample(sample, ids, {"needle": [(1, PROMPT_LEN)]}, (0, PROMPT_LEN), "")


def _unpack(arrays, cond):
    return {k[len(cond) + 2:]: v for k, v in arrays.items() if k.startswith(cond + "__")}


def test_ablate_sample_runs_every_condition_on_one_prefill():
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=12, record_hidden=False))
    enc = _encoded()
    ranking = np.arange(lm.layout.n_total, dtype=float).reshape(lm.layout.shape)  # last heads rank highest
    config = abl.AblationConfig(match="step")
    arrays, result = abl.ablate_sample(tracer, enc, ranking, config)
    assert set(result["conditions"]) == set(abl.CONDITIONS)
    plain = tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans)).arrays()
    none = _unpack(arrays, "none")
    for name in ("token_id", "top1_pos", "top1_token"):
        np.testing.assert_array_equal(none[name], plain[name])
    assert not none["ablated"].any()
    dyn = _unpack(arrays, "dynamic")
    d_t = copy_paste_score(dyn, enc.token_spans, generated_key="clean_token_id") >= 1
    np.testing.assert_array_equal(dyn["ablated"], d_t)  # exactly the step's own Eq. 1 set
    assert d_t.any()  # the test is not vacuous
    for cond in abl.BASELINES:
        c = _unpack(arrays, cond)
        sizes = c["ablated"].reshape(len(c["ablated"]), -1).sum(1)
        own = (copy_paste_score(c, enc.token_spans, generated_key="clean_token_id") >= 1).reshape(len(sizes), -1)
        np.testing.assert_array_equal(sizes, own.sum(1))  # --match step
        assert result["conditions"][cond]["overlap"] == (c["ablated"].reshape(len(sizes), -1) & own).sum(1).tolist()
    excl = _unpack(arrays, "static_excluding_dynamic")
    own = copy_paste_score(excl, enc.token_spans, generated_key="clean_token_id") >= 1
    assert not (excl["ablated"] & own).any()
    again, _ = abl.ablate_sample(tracer, enc, ranking, config)  # seeded per (seed, sample id)
    np.testing.assert_array_equal(again["random__ablated"], arrays["random__ablated"])


def test_the_runs_head_score_defines_d_t():
    """--score: the dynamic condition masks exactly the heads the given score calls active on each clean pass."""
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=8, record_hidden=False))
    enc = _encoded()
    plain = tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans)).arrays()
    threshold = float(np.median(plain["mass_needle"][0]))  # about half the heads of step 0 are active
    mass = HeadScore("needle_mass", lambda arrays, spans, span="needle": arrays[f"mass_{span}"], (), (), threshold)
    arrays, result = abl.ablate_sample(tracer, enc, np.ones(lm.layout.shape), abl.AblationConfig(match="step"),
                                       score=mass)
    dyn = _unpack(arrays, "dynamic")
    d_t = dyn["mass_needle"] > threshold  # the clean pass's mass, as recorded
    assert d_t.any() and not d_t.all()
    np.testing.assert_array_equal(dyn["ablated"], d_t)
    assert result["conditions"]["dynamic"]["dynamic"] == d_t.reshape(len(d_t), -1).sum(1).tolist()
    static = _unpack(arrays, "static")["ablated"]  # --match step: as many heads as that step's D_t
    assert static.reshape(len(static), -1).sum(1).tolist() == result["conditions"]["static"]["dynamic"]
    assert abl.score_part(None, "needle") == {} == abl.score_part("copy_paste", "needle")
    assert abl.score_part("reasoning", "needle") == {"score": {"name": "reasoning", "args": {"span": "needle"}}}


def _tiny_samples(n=2):
    out = []
    for i in range(n):
        enc = _encoded(seed=3 + i)
        sample = Sample(f"tiny-{i}", "ctx", "q?", "zzz", {}, PromptFormat(None, "{context}"),
                        metadata={"length": PROMPT_LEN, "depth": 50.0})
        out.append(EncodedSample(sample, enc.input_ids, enc.token_spans, enc.context_tokens, ""))
    return out


def test_run_level_match_masks_the_pooled_mean_and_resumes_with_the_same_count(tmp_path):
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=8, record_hidden=False))
    samples, ranking = _tiny_samples(), np.ones(lm.layout.shape)
    run = RunDir.create(tmp_path / "abl", {"kind": "ablation"})
    config = abl.AblationConfig()
    matching = abl.ablate_samples(run, tracer, samples, ranking, config, quiet=True)
    rows = run.sample_results()
    masked = [r["conditions"]["dynamic"]["heads_masked"] for r in rows]
    steps = [c for m in masked for c in m]
    assert any(steps)  # the dynamic condition masked something, so the count must not be 0
    assert matching["heads"] == max(1, int(np.floor(np.mean(steps) + 0.5))) and matching["n_steps"] == len(steps)
    for r in rows:
        assert r["matched_heads"] == matching["heads"]  # one count for the whole run
        for cond in abl.BASELINES:
            assert set(r["conditions"][cond]["heads_masked"]) <= {matching["heads"]}
    # the first pass is reused: none/dynamic of the main run are the first pass's
    first = RunDir.open(run.path / "first_pass").sample_results()
    assert [f["conditions"]["dynamic"] for f in first] == [r["conditions"]["dynamic"] for r in rows]
    # kill after the first sample of the second pass: the resumed run gets the same count and records
    victim = run.path / "samples" / "tiny-1.json"
    before = json.loads(victim.read_text())
    victim.unlink()
    again = abl.ablate_samples(run, tracer, samples, ranking, config, quiet=True)
    assert again == matching and json.loads(victim.read_text()) == before
    with pytest.raises(ValueError, match="first pass"):
        abl.ablate_sample(tracer, samples[0], ranking, config)


def test_sample_scope_matches_each_samples_own_mean_in_one_pass(tmp_path):
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=8, record_hidden=False))
    arrays, result = abl.ablate_sample(tracer, _encoded(), np.ones(lm.layout.shape),
                                       abl.AblationConfig(match_scope="sample"))
    n = result["matched_heads"]
    sizes = arrays["dynamic__ablated"].reshape(len(arrays["dynamic__ablated"]), -1).sum(1)
    assert sizes.any() and n == max(1, int(np.floor(sizes.mean() + 0.5)))
    for cond in abl.BASELINES:
        steps = arrays[f"{cond}__ablated"]
        assert (steps.reshape(len(steps), -1).sum(1) == n).all()


def test_progressive_sample_k0_is_unmasked_and_k_all_masks_every_head():
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=6, record_hidden=False, row_spans=("needle",)))
    enc = _encoded()
    static = np.ones(lm.layout.shape, bool)
    arrays, result = prog.progressive_sample(tracer, enc, (0, 3, lm.layout.n_total), static, abl.AblationConfig())
    plain = tracer.generate(tracer.prefill(enc.input_ids, enc.token_spans)).arrays()
    np.testing.assert_array_equal(arrays["k0__token_id"], plain["token_id"])
    np.testing.assert_array_equal(arrays["k0__masked_top1_pos"], plain["top1_pos"])
    assert not arrays["k0__ablated"].any() and result["conditions"]["k0"]["compensation"] == 0
    assert (arrays["k3__ablated"].reshape(len(arrays["k3__ablated"]), -1).sum(1) == 3).all()
    assert arrays[f"k{lm.layout.n_total}__ablated"].all()
    assert result["conditions"][f"k{lm.layout.n_total}"]["compensation"] == 0  # masked heads never compensate


def test_a_condition_that_stops_at_once_is_recorded_as_empty():
    lm = make_tiny_lm("llama")
    tracer = Tracer(lm, TraceConfig(max_new_tokens=4, record_hidden=False, row_spans=("needle",)))
    enc = _encoded()
    all_heads = lm.layout.n_total
    first, _ = prog.progressive_sample(tracer, enc, (all_heads,), np.ones(lm.layout.shape, bool), abl.AblationConfig())
    tracer.stop_ids = {int(first[f"k{all_heads}__token_id"][0])}  # masking every head now ends the answer at once
    arrays, result = prog.progressive_sample(tracer, enc, (0, all_heads), np.ones(lm.layout.shape, bool),
                                            abl.AblationConfig())
    empty = result["conditions"][f"k{all_heads}"]
    assert empty["n_steps"] == 0 and empty["compensation"] == 0 and empty["heads_masked"] == []
    assert arrays[f"k{all_heads}__ablated"].shape == (0,) + lm.layout.shape
