"""Run the real `dynheads` command line in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).with_name("dynheads")


def dynheads(*args, timeout=600, env_extra=None, **popen):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          **popen)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def support_only(record: dict) -> dict:
    """A HotpotQA record (HF format) with only its supporting paragraphs: short prompts for tests."""
    gold = set(record["supporting_facts"]["title"])
    keep = [i for i, t in enumerate(record["context"]["title"]) if t in gold]
    ctx = record["context"]
    return {**record, "context": {"title": [ctx["title"][i] for i in keep], "sentences": [ctx["sentences"][i] for i in keep]}}
