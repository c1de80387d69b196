"""Temporal-offset CCA on synthetic runs with planted relations, plus its run folder edge and bad input."""
import json

import numpy as np
import pytest
from sklearn.cross_decomposition import CCA

from dynheads.analyses import cca
from dynheads.analyses.cca import CcaConfig, format_cca_table, temporal_cca
from dynheads.errors import DataError
from dynheads.runs import RunDir

S, T, D, L, H = 60, 30, 64, 2, 8  # samples, steps per sample, hidden size, layers, heads
CFG = CcaConfig(n_boot=200)


def _ids():
    return np.repeat([f"s{i:02d}" for i in range(S)], T), np.tile(np.arange(T), S)


def _planted(k: int, seed: int = 0, noise: float = 0.05):
    """Hidden [S*T, D] random; scores at step t = sigmoid(3 W h_{t-k}) + noise; head 0 never varies."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(S, T, D))
    w = rng.normal(size=(D, L * H)) / np.sqrt(D)
    scores = rng.random((S, T, L * H))
    scores[:, k:] = 1 / (1 + np.exp(-3 * hidden[:, : T - k] @ w)) + noise * rng.normal(size=(S, T - k, L * H))
    scores[..., 0] = 0.0
    return hidden.reshape(S * T, D), scores.reshape(S * T, L, H)


def test_exact_linear_relation_gives_top1_of_one_in_sample():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(S * T, D))
    scores = (hidden[:, :L * H] @ rng.normal(size=(L * H, L * H))).reshape(-1, L, H)
    res = temporal_cca(hidden, scores, *_ids(), [0], CFG, np.random.default_rng(1))
    assert res.offsets[0].in_sample.top1 == pytest.approx(1.0, abs=1e-6)
    assert res.offsets[0].heldout.top1 == pytest.approx(1.0, abs=1e-6)


def test_exact_solver_matches_scikit_learn_cca():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    y = np.c_[x[:, :3] @ rng.normal(size=(3, 4)), np.zeros((400, 1))] + rng.normal(size=(400, 5)) * [0.3, 1, 2, 3, 0.1]
    u, v = CCA(n_components=4, max_iter=5000, tol=1e-12).fit(x, y).transform(x, y)
    expected = [np.corrcoef(u[:, i], v[:, i])[0, 1] for i in range(4)]
    np.testing.assert_allclose(cca._fit_cca(x, y, 4)[4], expected, atol=1e-6)


def test_planted_relation_at_offset_two_is_found_held_out_and_only_there():
    hidden, scores = _planted(k=2)
    res = temporal_cca(hidden, scores, *_ids(), range(4), CFG, np.random.default_rng(1))
    by_k = {o.k: o for o in res.offsets}
    assert by_k[2].heldout.top1 > 0.9  # observed 0.95
    assert by_k[2].heldout_top1_ci.low > 0.85
    assert abs(by_k[2].null.top1) < 0.3
    for k in (0, 1, 3):
        assert abs(by_k[k].heldout.top1) < 0.3
    assert by_k[2].margin_over_persistence.excludes_zero and by_k[2].margin_over_position.excludes_zero
    assert not by_k[0].margin_over_position.excludes_zero
    assert res.n_constant_heads == 1 and res.n_heads == L * H
    assert res.n_train_samples + res.n_test_samples == S and res.n_test_samples == 18
    assert by_k[3].n_pairs == S * (T - 3)


def test_shuffled_data_is_low_held_out_though_in_sample_is_inflated():
    hidden, scores = _planted(k=0)
    shuffled = scores[np.random.default_rng(5).permutation(len(scores))]
    res = temporal_cca(hidden, shuffled, *_ids(), range(2), CFG, np.random.default_rng(1))
    for o in res.offsets:
        assert abs(o.heldout.top1) < 0.3 and abs(o.null.top1) < 0.3
        assert o.in_sample.top1 > 0.15  # chance canonical correlation of 60 vs 15 dims in 1,800 rows


def test_position_control_explains_step_dependent_scores():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(S * T, D))
    _, steps = _ids()
    profile = rng.random((T, L * H))
    scores = (profile[steps] + 0.05 * rng.normal(size=(S * T, L * H))).reshape(-1, L, H)
    o = temporal_cca(hidden, scores, *_ids(), [0], CFG, np.random.default_rng(1)).offsets[0]
    assert o.position.top1 > 0.9 and abs(o.heldout.top1) < 0.3
    assert o.margin_over_position.high < 0


def test_persistence_control_explains_persistent_sets():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(S * T, D))
    blocks = rng.random((S, T // 5, L * H))  # each set is held for 5 steps
    scores = np.repeat(blocks, 5, axis=1).reshape(-1, L, H)
    by_k = {o.k: o for o in temporal_cca(hidden, scores, *_ids(), [0, 1], CFG, np.random.default_rng(1)).offsets}
    assert by_k[0].persistence.top1 > 0.6 and by_k[1].persistence.top1 > 0.6
    assert abs(by_k[1].heldout.top1) < 0.3


def _write_run(tmp_path, hidden, scores, n_samples, steps=T, with_hidden=True):
    run = RunDir.create(tmp_path / "run", {"task": "synthetic", "score": "copy_paste"})
    for i in range(n_samples):
        rows = slice(i * steps, (i + 1) * steps)
        arrays = {"token_id": np.arange(steps), "score": scores[rows].astype(np.float32)}
        if with_hidden:
            arrays["hidden"] = hidden[rows].astype(np.float32)
        run.write_sample(f"s{i:02d}", arrays, {"order": i})
    return run


def test_run_writes_result_and_figure(tmp_path):
    hidden, scores = _planted(k=1)
    run = _write_run(tmp_path, hidden, scores, 12)
    res = cca.run(RunDir.open(run.path), CcaConfig(max_offset=2, n_boot=100))
    text = (run.path / "results" / "cca.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    stored = json.loads(text)
    assert [o["k"] for o in stored["offsets"]] == [0, 1, 2]
    assert stored["offsets"][1]["heldout"]["top1"] == pytest.approx(res.offsets[1].heldout.top1)
    assert stored["paper_top1"][0] == 0.965
    assert (run.path / "figures" / "cca_offsets.png").stat().st_size > 0
    assert (run.path / "figures" / "cca_offsets.svg").stat().st_size > 0
    table = format_cca_table(res)
    assert "0.965" in table and len(table.splitlines()) == 4


def test_offsets_without_enough_pairs_are_skipped_and_counted():
    hidden, scores = _planted(k=0)
    res = temporal_cca(hidden, scores, *_ids(), [0, T, T + 3], CFG, np.random.default_rng(1))
    assert [o.k for o in res.offsets] == [0]
    assert [s["k"] for s in res.skipped_offsets] == [T, T + 3]
    assert res.skipped_offsets[0]["reason"] == "0 train / 0 test pairs"
    with pytest.raises(DataError, match="lower --max-offset"):
        temporal_cca(hidden, scores, *_ids(), [T], CFG, np.random.default_rng(1))


def test_bad_input_raises_one_line_data_errors(tmp_path):
    hidden, scores = _planted(k=0)
    ids, steps = _ids()
    few = ids < "s04"
    with pytest.raises(DataError, match="at least 5 samples") as err:
        temporal_cca(hidden[few], scores[few], ids[few], steps[few], [0], CFG, np.random.default_rng(1))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="never vary"):
        temporal_cca(hidden, np.zeros_like(scores), ids, steps, [0], CFG, np.random.default_rng(1))
    run = _write_run(tmp_path, hidden, scores, 6, with_hidden=False)
    with pytest.raises(DataError, match="hidden"):
        cca.run(RunDir.open(run.path), CcaConfig(max_offset=1))


def test_cca_command_prints_the_table_then_the_run_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from dynheads.cli.correlation import register

    app = typer.Typer()
    register(app)
    hidden, scores = _planted(k=0)
    run = _write_run(tmp_path, hidden, scores, 8)
    out = CliRunner().invoke(app, ["cca", str(run.path), "--max-offset", "1", "--seed", "3"])
    assert out.exit_code == 0, out.output
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(run.path) and lines[0].split()[:2] == ["k", "paper"]
    assert json.loads((run.path / "results" / "cca.json").read_text())["config"]["seed"] == 3
