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
