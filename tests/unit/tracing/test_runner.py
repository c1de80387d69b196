"""The per-sample driver: Ctrl-C says what finished and how to resume; bad first samples fail early."""
import numpy as np
import pytest

from dynheads.errors import DataError, Interrupted
from dynheads.runs import RunDir
from dynheads.tasks.base import EncodedSample, PromptFormat, Sample
from dynheads.tracing.runner import first_checked, run_samples


def _encoded(sid: str) -> EncodedSample:
    sample = Sample(sid, "context", "question", "answer", {}, PromptFormat(None, "{context}"))
    return EncodedSample(sample, [1, 2, 3], {}, (0, 1), "prompt")


def test_ctrl_c_names_the_finished_samples_and_how_to_resume(tmp_path):
    run = RunDir.create(tmp_path / "run", {"kind": "test"})

    def work(enc):
        if enc.sample.id == "s2":
            raise KeyboardInterrupt
        return {"token_id": np.arange(2)}, {}

    samples = [_encoded(f"s{i}") for i in range(4)]
    with pytest.raises(Interrupted) as err:
        run_samples(run, samples, work, total=4, quiet=True)
    assert err.value.exit_code == 130
    assert str(err.value) == (f"interrupted: 2 of 4 samples are finished in {run.path} (2 in this call; last "
                              "finished: s1); rerun the same command to resume")
    assert run.done_samples() == {"s0", "s1"}
    with pytest.raises(Interrupted, match="interrupted: 2 of 4 samples .*0 in this call\\)"):
        run_samples(run, samples, work, total=4, quiet=True)  # a resumed run skips s0, s1 and stops at s2 again


def test_first_checked_builds_the_first_sample_at_once():
    def samples():
        raise DataError("needle file n.jsonl line 1: bad")
        yield  # pragma: no cover

    with pytest.raises(DataError, match="line 1"):
        first_checked(samples())
    assert list(first_checked(iter([1, 2, 3]))) == [1, 2, 3] and list(first_checked([])) == []
