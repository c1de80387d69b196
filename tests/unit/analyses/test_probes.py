"""MLP probe and its baselines on synthetic runs with planted relations, plus the run edge and bad input."""
import json
import tempfile
from pathlib import Path
from dataclasses import replace
import math

import numpy as np
import pytest
import torch

from dynheads.analyses import probe_baselines, probe_table, probes
from dynheads.analyses.probe_table import format_probe_table, probe_heads
from dynheads.analyses.probes import Probe, ProbeConfig, asymmetric_loss, build_mlp, fit_probe
from dynheads.errors import ConfigError, DataError
from dynheads.runs import RunDir

S, T, D, L, H = 60, 30, 16, 2, 4  # samples, steps per sample, hidden size, layers, heads
# a larger lr than the paper's so 30 epochs suffice; 0.5: the copy_paste score's registered threshold
FAST = ProbeConfig(max_epochs=30, lr=3e-3, n_boot=500, active_threshold=0.5)


def _ids(n=S, t=T):
    return np.repeat([f"s{i:02d}" for i in range(n)], t), np.tile(np.arange(t), n)


def _planted(k=0, seed=0, continuous=False):
    """Head active at step t where |w_h · h_{t-k}| > 1: nonlinear, so a linear probe cannot fit it."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(S, T, D)).astype(np.float32)
    w = rng.normal(size=(D, L * H)) / np.sqrt(D)
    proj = np.abs(hidden[:, : T - k] @ w)
    scores = (rng.random((S, T, L * H)) < 0.3).astype(np.float32)
    scores[:, k:] = 1 / (1 + np.exp(-4 * (proj - 1))) if continuous else proj > 1
    return hidden.reshape(S * T, D), scores.reshape(S * T, L, H)


def _by_name(result):
    return {row.name: row.metrics for row in result.predictors}


def test_asymmetric_loss_hand_values():
    zero = torch.zeros(1, 2)
    value = asymmetric_loss(zero, torch.tensor([[1.0, 0.0]])).item()
    positive = -(1 - 0.5) ** 1 * math.log(0.5)  # (1 - p)^γ+ log p
    negative = -(0.5 - 0.05) ** 4 * math.log(1 - 0.45)  # p_m^γ- log(1 - p_m), p_m = p − clip
    assert value == pytest.approx(positive + negative, rel=1e-6)


def test_asymmetric_loss_without_focusing_is_binary_cross_entropy():
    logits, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([[1.0, 0, 1]] * 5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 5
    assert asymmetric_loss(logits, y, gamma_neg=0, gamma_pos=0, clip=0).item() == pytest.approx(bce.item(), rel=1e-5)


def test_mlp_shapes_and_the_papers_parameter_count():
    mlp = build_mlp(D, (2 * D, D, D), L * H, 0.1)
    assert [m.out_features for m in mlp if isinstance(m, torch.nn.Linear)] == [2 * D, D, D, L * H]
    assert sum(isinstance(m, torch.nn.Dropout) for m in mlp) == 3
    d, sizes, heads = 4096, probes.PAPER_SIZES, 1024  # llama3.1-8b: 32 layers x 32 heads
    widths = (d, *sizes, heads)
    n_params = sum(a * b + b for a, b in zip(widths, widths[1:]))
    assert 70e6 < n_params < 90e6  # paper.md: "roughly 70-90M parameters"


def test_probe_recovers_a_planted_relation_and_beats_every_baseline():
    hidden, scores = _planted()
    res = probe_heads(hidden, scores, *_ids(), FAST, np.random.default_rng(1))
    m = _by_name(res)
    assert m["probe"]["f1"] > m["frequency prior"]["f1"] + 0.15  # observed 0.79 vs 0.55
    assert m["probe"]["auprc"] > 0.75
    assert res.beats_all_baselines and all(g.excludes_zero for g in res.gaps.values())
    assert set(res.gaps) == {"linear probe", "shuffled-label probe", "frequency prior", "position", "copy step",
                             "copy last set"}
    assert res.n_samples == {"train": 42, "val": 12, "test": 6} and res.hidden_sizes == [2 * D, D, D]
    assert res.training["probe"]["epochs"] <= FAST.max_epochs
    table = format_probe_table(res)
    assert "paper llama3.1-8b" in table and "0.8349" in table and table.splitlines()[-1].endswith("yes")


def test_probe_fails_on_shuffled_labels():
    hidden, scores = _planted()
    shuffled = scores[np.random.default_rng(7).permutation(len(scores))]
    res = probe_heads(hidden, shuffled, *_ids(), FAST, np.random.default_rng(1))
    m = _by_name(res)
    assert not res.beats_all_baselines
    assert m["probe"]["f1"] < m["frequency prior"]["f1"] + 0.05


def test_offset_probe_reads_the_future_only_at_the_planted_offset():
    hidden, scores = _planted(k=2)
    at2 = probe_heads(hidden, scores, *_ids(), replace(FAST, offset=2), np.random.default_rng(1))
    at0 = probe_heads(hidden, scores, *_ids(), FAST, np.random.default_rng(1))
    assert at2.beats_all_baselines and at2.n_pairs["train"] + at2.n_pairs["val"] + at2.n_pairs["test"] == S * (T - 2)
    assert not at0.beats_all_baselines


def test_copy_baseline_wins_when_sets_persist():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(S * T, D)).astype(np.float32)
    blocks = rng.random((S, T // 5, L * H)) < 0.3  # each set is held for 5 steps; hidden says nothing
    scores = np.repeat(blocks, 5, axis=1).reshape(-1, L, H).astype(np.float32)
    cfg = replace(FAST, shuffled_baseline=False, max_epochs=5)
    res = probe_heads(hidden, scores, *_ids(), cfg, np.random.default_rng(1))
    m = _by_name(res)
    assert m["copy last set"]["f1"] > 0.7 and m["copy last set"]["f1"] > m["probe"]["f1"] + 0.2
    assert not res.gaps["copy last set"].excludes_zero and not res.beats_all_baselines


def test_regressor_recovers_continuous_scores():
    hidden, scores = _planted(continuous=True)
    cfg = replace(FAST, regress=True, max_epochs=60)
    res = probe_heads(hidden, scores, *_ids(), cfg, np.random.default_rng(1))
    m = _by_name(res)
    assert set(m) == {"probe", "ridge", "shuffled-label probe", "frequency prior", "position", "copy step",
                      "copy last set"}
    assert m["shuffled-label probe"]["r2"] < 0.1 < m["probe"]["r2"] - 0.5  # shuffled labels carry nothing
    assert m["probe"]["r2"] > 0.6 and m["ridge"]["r2"] < 0.2  # observed 0.73 and −0.01: |w·h| is not linear
    assert m["probe"]["mse"] < m["frequency prior"]["mse"] / 2
    assert res.beats_all_baselines and res.gap_metric == "variance-weighted R2"
    assert "paper llama3.1-8b" in format_probe_table(res) and "0.8120" in format_probe_table(res)


def _write_run(tmp_path, hidden, scores, n_samples, with_hidden=True, score="copy_paste"):
    run = RunDir.create(tmp_path / "run", {"task": "synthetic", "score": {"name": score, "args": {}}})
    for i in range(n_samples):
        rows = slice(i * T, (i + 1) * T)
        arrays = {"token_id": np.arange(T), "score": scores[rows].astype(np.float32)}
        if with_hidden:
            arrays["hidden"] = hidden[rows]
        run.write_sample(f"s{i:02d}", arrays, {"order": i})
    return run


def test_run_writes_the_result_file(tmp_path):
    hidden, scores = _planted()
    run = _write_run(tmp_path, hidden, scores, 12)
    cfg = ProbeConfig(max_epochs=2, n_boot=50, shuffled_baseline=False)
    res = probe_table.run(RunDir.open(run.path), cfg)
    text = (run.path / "results" / "probe_k0.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    stored = json.loads(text)
    assert stored["predictors"][0]["name"] == "probe" and stored["offset"] == 0
    assert stored["predictors"][0]["metrics"]["f1"] == pytest.approx(res.predictors[0].metrics["f1"])
    assert stored["config"]["split"] == [0.7, 0.2, 0.1]
    assert stored["config"]["active_threshold"] == 0.5  # the copy_paste score's registered threshold


def test_bad_input_raises_one_line_errors(tmp_path):
    hidden, scores = _planted()
    ids, steps = _ids()
    few = ids < "s09"
    with pytest.raises(DataError, match="at least 10 samples") as err:
        probe_heads(hidden[few], scores[few], ids[few], steps[few], FAST, np.random.default_rng(1))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=f"offset {T}"):
        probe_heads(hidden, scores, ids, steps, ProbeConfig(offset=T, active_threshold=0.5), np.random.default_rng(1))
    with pytest.raises(ConfigError, match="active_threshold"):
        probe_heads(hidden, scores, ids, steps, ProbeConfig(), np.random.default_rng(1))
    run = _write_run(tmp_path, hidden, scores, 10, with_hidden=False)
    with pytest.raises(DataError, match="hidden"):
        probe_table.run(RunDir.open(run.path), FAST)
    with pytest.raises(ConfigError):
        ProbeConfig(split=(0.5, 0.2, 0.1))
    with pytest.raises(ConfigError, match="activation"):
        ProbeConfig(activation="swish")


def test_probe_command_prints_the_table_then_the_run_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from dynheads.cli.correlation import register

    app = typer.Typer()
    register(app)
    hidden, scores = _planted(continuous=True)
    run = _write_run(tmp_path, hidden, scores, 10)
    out = CliRunner().invoke(app, ["probe", str(run.path), "--offset", "1", "--regress", "--max-epochs", "2"])
    assert out.exit_code == 0, out.output
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(run.path) and lines[0].startswith("Table 3")
    assert json.loads((run.path / "results" / "probe_regress_k1.json").read_text())["offset"] == 1


def test_copy_step_baseline_knows_when_but_not_which():
    # 4 training pairs: steps 0, 2 copy (heads {0} and {0, 1} active), steps 1, 3 do not
    y = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    copy_step = y.any(axis=1)
    tr = np.array([True, True, True, True, False, False])
    pred = probe_baselines.copy_step_rate(copy_step, y, tr)
    # rows 4 (a copy step) and 5 (not) get the training rates of their kind: copy [1, 0.5, 0], other [0, 0, 0]
    np.testing.assert_allclose(pred[4], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(pred[5], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(probe_baselines.frequency_prior(y, tr)[5], [0.5, 0.25, 0.0])
    only_copies = probe_baselines.copy_step_rate(copy_step, y, tr & copy_step)  # no non-copy step in train
    np.testing.assert_allclose(only_copies[5], [1.0, 0.5, 0.0])  # falls back to the prior


def test_labels_use_the_runs_registered_threshold_with_a_strict_comparison(tmp_path):
    hidden, scores = _planted(continuous=True)
    scores = np.where(scores > 0.5, 0.1, 0.3 * scores).astype(np.float32)  # 0.1 exactly is not "exceeds"
    run = _write_run(tmp_path, hidden, scores, 12, score="reasoning")
    res = probe_table.run(RunDir.open(run.path), ProbeConfig(max_epochs=1, n_boot=20, shuffled_baseline=False))
    assert res.config.active_threshold == 0.1  # Eq. 2's registered threshold, not 0.5
    assert probes.probe_targets(np.array([[0.1, 0.1001, 0.5]]), res.config).tolist() == [[0, 1, 1]]
    other = RunDir.create(tmp_path / "plain", {"kind": "niah"})
    with pytest.raises(DataError, match="names no head score"):
        probe_table.score_threshold(other)


def test_fit_probe_predicts_saves_and_loads_at_an_offset(tmp_path):
    hidden, scores = _planted(k=1)
    ids, steps = _ids()
    cfg = replace(FAST, offset=1, hidden_sizes=(32,))
    probe = fit_probe(hidden, scores, ids, steps, cfg, np.random.default_rng(0), meta={"run": "synthetic"})
    assert probe.task == "classify" and probe.offset == 1 and probe.label_threshold == 0.5 and probe.shape == (L, H)
    assert 0 < probe.decision_threshold < 1 and probe.meta["run"] == "synthetic"
    pred = probe.predict(hidden)
    assert pred.shape == (S * T, L, H) and probe.predict(hidden[3]).shape == (L, H) and ((0 <= pred) & (pred <= 1)).all()
    # the state at step n predicts the heads of step n + 1 (planted), far better than chance
    target = scores.reshape(S, T, -1)[:, 1:].reshape(-1) > 0.5
    guess = pred.reshape(S, T, -1)[:, :-1].reshape(-1) >= probe.decision_threshold
    assert (guess == target).mean() > 0.8
    path = probe.save(tmp_path / "p.pt")
    assert json.loads((tmp_path / "p.pt.json").read_text())["shape"] == [L, H]
    loaded = Probe.load(path)
    np.testing.assert_allclose(loaded.predict(hidden[:5]), probe.predict(hidden[:5]), rtol=1e-6)
    assert (loaded.offset, loaded.decision_threshold, loaded.meta) == (1, probe.decision_threshold, probe.meta)
    linear = fit_probe(hidden, scores, ids, steps, cfg, np.random.default_rng(0), linear=True)
    assert linear.arch["sizes"] == [] and sum(isinstance(m, torch.nn.Linear) for m in linear.model) == 1
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    with pytest.raises(ConfigError, match="not a saved dynheads probe"):
        Probe.load(tmp_path / "bad.pt")
    with pytest.raises(DataError, match="at least 2 samples"):
        fit_probe(hidden[:T], scores[:T], ids[:T], steps[:T], cfg)


def test_ridge_probe_outputs_each_heads_base_rate_and_follows_the_signal():
    """Closed form: with uninformative inputs every output is its head's mean target (the base rate), so the
    top k across heads is the k most often active; an informative input moves its head's output."""
    from dynheads.analyses.probes import fit_ridge_probe

    rng = np.random.default_rng(0)
    n, d = 400, 16
    x = rng.normal(size=(n, d))
    rates = np.array([0.02, 0.3, 0.1, 0.6])
    y = (rng.random((n, 1, 4)) < rates[None, None]).astype(np.float32)
    y[:, 0, 0] = (x[:, 0] > 1.5)  # head 0 follows input 0
    ids = np.repeat(np.arange(20), n // 20)
    probe = fit_ridge_probe(x, y, ids, np.random.default_rng(1))
    assert probe.shape == (1, 4) and probe.task == "regress" and probe.meta["fit"] == "ridge"
    mean_out = probe.predict(x).mean(0)[0]
    np.testing.assert_allclose(mean_out, y.mean(0)[0], atol=1e-4)  # intercepts: the base rates
    high, low = probe.predict(np.eye(d)[0] * 3), probe.predict(-np.eye(d)[0] * 3)
    assert high[0, 0] > low[0, 0] + 0.1
    saved = probe.save(Path(tempfile.mkdtemp()) / "p.pt")
    np.testing.assert_allclose(type(probe).load(saved).predict(x), probe.predict(x), rtol=1e-5, atol=1e-6)
