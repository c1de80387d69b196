"""Model loading faults: truncated GGUF files, devices this machine lacks, half-converted cache folders."""
import os
import subprocess
import sys

import pytest
import torch

from dynheads.errors import ModelError
from dynheads.files import remove_stale_temps
from dynheads.models import _check_gguf, check_device, default_model_path


@pytest.mark.parametrize("size", [100, 5000, 3_000_000])
def test_a_truncated_gguf_is_one_model_error(tmp_path, size):
    with open(default_model_path(), "rb") as f:
        head = f.read(size)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(ModelError, match=f"cut.gguf is truncated or damaged \\(size {size} bytes\\)"):
        _check_gguf(cut)


def test_devices_torch_cannot_use_are_refused_before_loading():
    check_device("cpu")
    with pytest.raises(ModelError, match="unknown --device 'gpu0'"):
        check_device("gpu0")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ModelError, match=f"--device cuda:{n}"):
        check_device(f"cuda:{n}")  # one past the last GPU: on a CPU-only machine, any CUDA device
    if n:
        check_device("cuda:0")
    else:
        with pytest.raises(ModelError, match="no cuda device"):
            check_device("cuda")


def test_an_interrupted_conversion_leaves_nothing_behind_after_the_next_one(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    half = tmp_path / f"SmolLM2-135M-Instruct.Q4_1-0123456789abcdef.tmp{dead}-0a0b0c0d"
    old_style = tmp_path / f"Other-0123.tmp{dead}"
    for folder in (half, old_style):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    done = tmp_path / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    done.mkdir()
    mine = tmp_path / f"Mine.tmp{os.getpid()}-00000000"  # a conversion in progress in a live process
    mine.mkdir()
    assert sorted(remove_stale_temps(tmp_path)) == sorted([half, old_style])
    assert done.is_dir() and mine.is_dir()
