"""Run folders: resolved config first, one records file and one result file per sample, resume.

  config.json               resolved config + versions + model fingerprint (written first)
  records/<sample>.npz      per-step records (see records.py)
  samples/<sample>.json     the sample, its token spans, the response and its metrics (commit marker)
  results/<name>.json       experiment summaries
  figures/<name>.png|svg    figures

A sample is finished when its samples/<id>.json exists; it is written last and atomically, so a
killed run resumes by skipping exactly the finished samples.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from dynheads.errors import ConfigError, DataError
from dynheads.records import Records, concat_records, load_sample_records, save_sample_records

# Keys that may differ between an interrupted run and its resumption.
_VOLATILE = {"versions", "created", "command"}
_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def safe_name(sample_id: str) -> str:
    """A sample id as a file name (ids from user data may hold slashes or spaces)."""
    return _SAFE.sub("_", sample_id)


class RunDir:
    """One run folder; create with `RunDir.create(path, config)` or open with `RunDir.open(path)`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path, config: dict[str, Any]) -> "RunDir":
        """Start a run, or resume it when the stored config matches (else name the first differing key)."""
        run = cls(Path(path))
        cfg_path = run.path / "config.json"
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            diff = _first_difference(
                {k: v for k, v in old.items() if k not in _VOLATILE},
                {k: v for k, v in _jsonable(config).items() if k not in _VOLATILE},
            )
            if diff:
                raise ConfigError(f"{run.path} holds a run with a different config ({diff}); use another --out")
        else:
            run.path.mkdir(parents=True, exist_ok=True)
            _atomic_write(cfg_path, json.dumps(_jsonable(config), indent=2))
        for sub in ("records", "samples", "results", "figures"):
            (run.path / sub).mkdir(exist_ok=True)
        return run

    @classmethod
    def open(cls, path) -> "RunDir":
        run = cls(Path(path))
        if not (run.path / "config.json").exists():
            raise DataError(f"{run.path} is not a dynheads run folder (no config.json)")
        for sub in ("results", "figures"):
            (run.path / sub).mkdir(exist_ok=True)
        return run

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    # --- per-sample output -------------------------------------------------------------
    def done_samples(self) -> set[str]:
        return {json.loads(p.read_text())["id"] for p in sorted((self.path / "samples").glob("*.json"))}

    def write_sample(self, sample_id: str, arrays: dict[str, np.ndarray], result: dict[str, Any]) -> None:
        """Records first, then the result file that marks the sample finished."""
        name = safe_name(sample_id)
        save_sample_records(self.path / "records" / f"{name}.npz", arrays)
        _atomic_write(self.path / "samples" / f"{name}.json", json.dumps(_jsonable({"id": sample_id, **result})))

    def sample_results(self) -> list[dict[str, Any]]:
        """Per-sample results in the order the samples were generated."""
        rows = [json.loads(p.read_text()) for p in (self.path / "samples").glob("*.json")]
        return sorted(rows, key=lambda r: r.get("order", 0))

    def read_records(self) -> Records:
        results = self.sample_results()
        if not results:
            raise DataError(f"{self.path} has no finished samples")
        return concat_records(
            [(r["id"], load_sample_records(self.path / "records" / f"{safe_name(r['id'])}.npz")) for r in results]
        )

    # --- experiment output -------------------------------------------------------------
    def write_result(self, name: str, obj: Any) -> Path:
        path = self.path / "results" / f"{name}.json"
        _atomic_write(path, json.dumps(_jsonable(obj), indent=2))
        return path

    def read_result(self, name: str) -> Any:
        path = self.path / "results" / f"{name}.json"
        if not path.exists():
            raise DataError(f"{self.path} has no result '{name}'")
        return json.loads(path.read_text())

    def figure_path(self, name: str) -> Path:
        return self.path / "figures" / f"{name}.png"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonable(obj: Any) -> Any:
    """Dataclasses, numpy values, tuples and paths as plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path + k}: only in {'new' if k in b else 'stored'} config"
            d = _first_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{path.rstrip('.')}: {a!r} != {b!r}"
