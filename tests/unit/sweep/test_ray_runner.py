"""A per-sample work function shipped from a weightless driver runs on a worker's loaded model exactly."""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported (loopback-only Ray)

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm, tiny_config
from dynheads.errors import DynheadsError
from dynheads.heads import HeadLayout
from dynheads.models import LoadedModel
from dynheads.scores.base import get_score
from dynheads.sweep.ray_runner import dump_work, load_work
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample
from dynheads.tracing.runner import SampleWorkWithInputs, trace_sample, write_sample
from dynheads.tracing.tracer import TraceConfig, Tracer


def _meta_lm(real):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    return LoadedModel(model, real.tokenizer, HeadLayout.from_config(model.config), "tiny", "", "tiny")


def _sample(i):
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(i)).tolist()
    sample = Sample(f"s{i}", "", "", "", {}, PromptFormat(None, "{context}"), metadata={"length": 40, "depth": 50.0})
    return EncodedSample(sample, ids, {"needle": [(1, 40)]}, (0, 40), "")


def test_shipped_work_runs_on_the_workers_model_and_matches_local_work():
    real = make_tiny_lm("llama")
    driver = _meta_lm(real)
    score, trace = get_score("copy_paste"), TraceConfig(max_new_tokens=6)
    metric = lambda response, sample: {"n_chars": len(response)}  # noqa: E731

    def work_on(lm):
        tracer = Tracer(lm, trace)
        return lambda enc: trace_sample(tracer, enc, score, metric)

    blob = dump_work(work_on(driver), driver)
    assert len(blob) < 100_000  # placeholders, not weights or the tokenizer
    shipped, local = load_work(blob, real), work_on(real)
    for i in range(2):
        (a, ra), (b, rb) = shipped(_sample(i)), local(_sample(i))
        assert ra == rb and sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_work_holding_a_driver_tensor_is_refused():
    driver = _meta_lm(make_tiny_lm("llama"))
    weight = driver.model.lm_head.weight
    with pytest.raises(DynheadsError, match="meta"):
        dump_work(lambda enc: weight.shape, driver)


def test_ctrl_c_during_a_ray_run_keeps_written_samples_and_says_how_to_resume(tmp_path, monkeypatch):
    """The pool's loop under a stand-in Ray (no cluster): Ctrl-C while waiting gives the local runner's message."""
    import ray

    from dynheads.errors import Interrupted
    from dynheads.runs import RunDir
    from dynheads.sweep import ray_runner

    class Actor:
        class run:  # noqa: N801  (ray's actor.method.remote(...) shape)
            @staticmethod
            def remote(ref, key, enc):
                return enc.sample.id  # the "object ref" is the sample id

    waits = []

    def wait(refs, num_returns=1):
        waits.append(len(refs))
        if len(waits) == 3:  # two samples written, then Ctrl-C
            raise KeyboardInterrupt
        return refs[:1], refs[1:]

    monkeypatch.setattr(ray, "put", lambda blob: "blob")
    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", lambda sid: ({"token_id": np.arange(2)}, {"id_seen": sid}))
    monkeypatch.setattr(ray_runner, "dump_work", lambda work, lm: b"work")
    pool = ray_runner.RayPool("tiny", workers=1)
    pool.started, pool.actors = True, [Actor()]
    run = RunDir.create(tmp_path / "run", {"kind": "test"})
    samples = [_sample(i) for i in range(4)]
    with pytest.raises(Interrupted) as err:
        pool.run_samples(None, run, samples, work=None, total=4, quiet=True)
    assert err.value.exit_code == 130
    assert str(err.value) == (f"interrupted: 2 of 4 samples are finished in {run.path} (2 in this call; last "
                              "finished: s1); rerun the same command to resume")
    assert run.done_samples() == {"s0", "s1"}


def test_work_holding_a_run_folder_is_refused(tmp_path):
    from dynheads.runs import RunDir

    driver = _meta_lm(make_tiny_lm("llama"))
    run = RunDir.create(tmp_path / "run", {"kind": "test"})
    with pytest.raises(DynheadsError, match="holds the run folder .*run"):
        dump_work(lambda enc: run.sample_results(), driver)


def test_the_pool_reads_per_sample_inputs_on_the_driver_and_sends_them_with_the_sample(tmp_path, monkeypatch):
    """SampleWorkWithInputs under a stand-in Ray: `work` is shipped, `read_inputs` runs here, once per sample."""
    import ray

    from dynheads.runs import RunDir
    from dynheads.sweep import ray_runner

    class Actor:
        class run:  # noqa: N801  (ray's actor.method.remote(...) shape)
            @staticmethod
            def remote(ref, key, enc, *inputs):
                results.append(shipped[0](enc, *inputs))
                return len(results) - 1  # the "object ref" is the result's index

    shipped, read, results = [], [], []
    monkeypatch.setattr(ray, "put", lambda blob: "blob")
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1: (refs[:1], refs[1:]))
    monkeypatch.setattr(ray, "get", lambda i: results[i])
    monkeypatch.setattr(ray_runner, "dump_work", lambda work, lm: shipped.append(work) or b"work")
    pool = ray_runner.RayPool("tiny", workers=1)
    pool.started, pool.actors = True, [Actor()]
    run = RunDir.create(tmp_path / "run", {"kind": "test"})

    def read_inputs(enc):
        read.append(enc.sample.id)
        return {"stored": enc.sample.id.upper()}

    work = SampleWorkWithInputs(lambda enc, inputs: ({"x": np.arange(2)}, {"got": inputs["stored"]}), read_inputs)
    assert pool.run_samples(None, run, [_sample(i) for i in range(3)], work, total=3, quiet=True) == 3
    assert shipped == [work.work] and read == ["s0", "s1", "s2"]
    assert [r["got"] for r in run.sample_results()] == ["S0", "S1", "S2"]


def test_two_pass_ablation_ships_work_that_needs_no_run_folder(tmp_path):
    """Run-level matching's second pass reads the first pass from the run folder: the driver reads it and
    the shipped work gets it with the sample. Here a stand-in worker (the work pickled from a weightless
    driver, run on a loaded model) runs each sample while the run folder is moved away."""
    from dynheads.experiments import ablation as abl
    from dynheads.runs import RunDir

    real = make_tiny_lm("llama")
    driver = _meta_lm(real)
    trace = TraceConfig(max_new_tokens=6, record_hidden=False)
    samples, ranking, config = [_sample(i) for i in range(2)], np.ones(real.layout.shape), abl.AblationConfig()
    assert config.two_pass
    folder, away = tmp_path / "shipped", tmp_path / "away"

    def worker_runner(run, items, work, total=None, quiet=False):
        read_inputs = work.read_inputs if isinstance(work, SampleWorkWithInputs) else None
        on_worker = load_work(dump_work(work.work if read_inputs else work, driver), real)
        for order, enc in enumerate(items):
            inputs = () if read_inputs is None else (read_inputs(enc),)  # on the driver
            folder.rename(away)  # the worker's view: no run folder
            try:
                arrays, result = on_worker(enc, *inputs)
            finally:
                away.rename(folder)
            write_sample(run, order, enc, arrays, result)
        return len(items)

    shipped_run = RunDir.create(folder, {"kind": "ablation"})
    local_run = RunDir.create(tmp_path / "local", {"kind": "ablation"})
    matching = abl.ablate_samples(shipped_run, Tracer(driver, trace), samples, ranking, config, runner=worker_runner)
    assert matching == abl.ablate_samples(local_run, Tracer(real, trace), samples, ranking, config, quiet=True)
    assert shipped_run.sample_results() == local_run.sample_results()
    assert (folder / "first_pass" / "records" / "s0.npz").is_file()
    for name in ("s0.npz", "s1.npz"):
        shipped, local = np.load(folder / "records" / name), np.load(tmp_path / "local" / "records" / name)
        assert sorted(shipped.files) == sorted(local.files)
        for key in local.files:
            np.testing.assert_array_equal(shipped[key], local[key])
