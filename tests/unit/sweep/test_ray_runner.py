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
from dynheads.tracing.runner import trace_sample
from dynheads.tracing.tracer import TraceConfig, Tracer


def _meta_lm(real):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    return LoadedModel(model, real.tokenizer, HeadLayout.from_config(model.config), "tiny", "", "tiny")


def _sample(i):
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(i)).tolist()
    sample = Sample(f"s{i}", "", "", "", {}, PromptFormat(None, "{context}"))
    return EncodedSample(sample, ids, {"needle": [(10, 18)]}, (0, 40), "")


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
