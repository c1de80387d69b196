"""Run folders: resolved config first, one records file and one result file per sample, resume.

  config.json               resolved config + versions + model fingerprint (written first)
  records/<sample>.npz      per-step records (see records.py)
  samples/<sample>.json     the sample, its token spans, the response and its metrics (commit marker)
  results/<name>.json       experiment summaries
  figures/<name>.png|svg    figures

A sample is finished when its samples/<id>.json is readable and its records file is a complete npz;
both are written atomically (unique temporary names, then a rename), the JSON last, so a killed run
resumes by skipping exactly the finished samples. One process writes a run folder at a time: `create`
takes an exclusive lock on `<folder>/.lock` that dies with the process (files.FolderLock).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dynheads.errors import ConfigError, DataError
from dynheads.files import LOCK_NAME, FolderLock, atomic_write, remove_stale_temps
from dynheads.records import Records, concat_records, load_sample_records, save_sample_records

log = logging.getLogger(__name__)

# Keys that may differ between an interrupted run and its resumption.
_VOLATILE = {"versions", "created", "command", "threads"}
_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def safe_name(sample_id: str) -> str:
    """A sample id as a file name (ids from user data may hold slashes or spaces)."""
    return _SAFE.sub("_", sample_id)


class RunDir:
    """One run folder; create with `RunDir.create(path, config)` or open with `RunDir.open(path)`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock: FolderLock | None = None  # held by the process that writes samples (create)

    @classmethod
    def create(cls, path, config: dict[str, Any]) -> "RunDir":
        """Start a run, or resume it when the stored config matches (else name the first differing key).

        Takes the folder's lock first (a second writer is refused), and removes temporaries that a
        killed writer left behind.
        """
        run = cls(Path(path))
        check_out(run.path)
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create run folder {run.path}: {exc.strerror}") from None
        run.lock = FolderLock.acquire(run.path)
        if run.lock is None:
            raise ConfigError(_busy(run.path))
        cfg_path = run.path / "config.json"
        if cfg_path.exists():
            old = _read_json(cfg_path)
            if not isinstance(old, dict):
                raise ConfigError(f"{cfg_path} is empty or damaged; use another --out")
            diff = _first_difference(
                {k: v for k, v in old.items() if k not in _VOLATILE},
                {k: v for k, v in _jsonable(config).items() if k not in _VOLATILE},
            )
            if diff:
                raise ConfigError(f"{run.path} holds a run with a different config ({diff}); use another --out")
        else:
            atomic_write(cfg_path, json.dumps(_jsonable(config), indent=2))
        remove_stale_temps(run.path)
        for sub in ("records", "samples", "results", "figures"):
            (run.path / sub).mkdir(exist_ok=True)
            for p in remove_stale_temps(run.path / sub):
                log.info("removed %s, left by an interrupted writer", p)
        return run

    @classmethod
    def open(cls, path, what: str = "") -> "RunDir":
        """An existing run folder, for analyses (no lock: they write only their own results).

        Its config.json is checked to be a run config before anything is written into the folder;
        `what` names the folder's role in messages ("detection run").
        """
        run = cls(Path(path))
        name = f"{what} {run.path}" if what else str(run.path)
        if not run.path.exists():
            raise DataError(f"{name} does not exist")
        if not run.path.is_dir():
            raise DataError(f"{name} is a file, not a run folder")
        cfg_path = run.path / "config.json"
        if not cfg_path.is_file():
            raise DataError(f"{name} is not a dynheads run folder (no config.json)")
        if not isinstance(_read_json(cfg_path), dict):
            raise DataError(f"{name} is not a dynheads run folder: its config.json is not a run config (a JSON "
                            "object written by dynheads), so it is damaged or belongs to something else")
        try:
            for sub in ("results", "figures"):
                (run.path / sub).mkdir(exist_ok=True)
                remove_stale_temps(run.path / sub)
        except OSError as exc:
            raise DataError(f"cannot write results into {run.path}: {exc.strerror}") from None
        return run

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    # --- per-sample output -------------------------------------------------------------
    def done_samples(self) -> set[str]:
        """Ids of finished samples. A marker that is empty or damaged, or whose records file is missing
        or incomplete, does not count: it is named in a warning and that sample is run again."""
        done = set()
        for p in sorted((self.path / "samples").glob("*.json")):
            row = _read_json(p)
            records = self.path / "records" / f"{p.stem}.npz"
            if row is None or "id" not in row:
                log.warning("%s is empty or damaged: its sample will be run again", p)
            elif not zipfile.is_zipfile(records):
                log.warning("%s is missing or incomplete: sample %s will be run again", records, row["id"])
            else:
                done.add(row["id"])
        return done

    def write_sample(self, sample_id: str, arrays: dict[str, np.ndarray], result: dict[str, Any]) -> None:
        """Records first, then the result file that marks the sample finished."""
        name = safe_name(sample_id)
        save_sample_records(self.path / "records" / f"{name}.npz", arrays)
        atomic_write(self.path / "samples" / f"{name}.json", json.dumps(_jsonable({"id": sample_id, **result})))

    def sample_results(self) -> list[dict[str, Any]]:
        """Per-sample results in the order the samples were generated (a damaged file is named)."""
        rows = []
        for p in (self.path / "samples").glob("*.json"):
            row = _read_json(p)
            if row is None or "id" not in row:
                raise DataError(f"{p} is empty or damaged: rerun the command that wrote {self.path} to redo "
                                "that sample")
            rows.append(row)
        return sorted(rows, key=lambda r: r.get("order", 0))

    def read_records(self) -> Records:
        """Every finished sample's records; refuses a run whose records are per condition (ablation, RAG)."""
        results = self.sample_results()
        if not results:
            raise DataError(f"{self.path} has no finished samples")
        loaded = []
        for r in results:
            loaded.append((r["id"], load_sample_records(self.path / "records" / f"{safe_name(r['id'])}.npz")))
            if len(loaded) == 1 and "token_id" not in loaded[0][1]:
                raise DataError(self._not_a_trace())
        return concat_records(loaded)

    def _not_a_trace(self) -> str:
        kind = self.config.get("kind", "unknown")
        detection = self.path / "detection"
        hint = f" (its static-ranking pass {detection} is one)" if (detection / "config.json").is_file() else ""
        return (f"{self.path} holds a run of kind '{kind}', whose records are kept per condition; this command reads "
                f"a traced run from `dynheads niah` or `dynheads multihop`{hint}")

    # --- experiment output -------------------------------------------------------------
    def write_result(self, name: str, obj: Any, config: Any = None, ignore: tuple[str, ...] = ("threads",)) -> Path:
        """results/<name>.json: the latest call's result. Given the call's config (a dataclass) with flags off
        their defaults, also results/<name>__<flag>=<value>.json, which no call with other flags overwrites."""
        text = json.dumps(_jsonable(obj), indent=2)
        path = self.path / "results" / f"{name}.json"
        atomic_write(path, text)
        variant = name if config is None else result_name(name, config, ignore)
        if variant != name:
            atomic_write(path.with_name(f"{variant}.json"), text)
        return path

    def read_result(self, name: str) -> Any:
        path = self.path / "results" / f"{name}.json"
        if not path.exists():
            raise DataError(f"{self.path} has no result '{name}'")
        return json.loads(path.read_text())

    def figure_path(self, name: str) -> Path:
        return self.path / "figures" / f"{name}.png"


def check_out(path) -> None:
    """Refuse an --out that cannot become (or resume) a run folder: a file, under a file, not writable,
    or being written by another process. Cheap: the CLI calls it before the model loads."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p} is a file, not a run folder")
    _check_writable_parent(p, "--out", "no folder can be made")
    if (p / LOCK_NAME).exists() and FolderLock.acquire(p) is None:
        raise ConfigError(_busy(p))


def check_out_file(path, flag: str = "--out", folder_ok: bool = False) -> None:
    """Refuse an output *file* that cannot be written: a folder (unless `folder_ok`, for outputs that
    may be a folder), under a file, or in a folder that is not writable. Cheap: before any work."""
    p = Path(path).expanduser()
    if p.is_dir() and not folder_ok:
        raise ConfigError(f"{flag} {p} is a folder; give the file to write")
    _check_writable_parent(p if p.is_dir() else p.parent, flag, "nothing can be written", p)


def _check_writable_parent(p: Path, flag: str, refused: str, named: Path | None = None) -> None:
    """The nearest existing ancestor of `p` (or `p`) must be a folder this process can write in."""
    named = named or p
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {named}: {parent} is a file, so {refused} under it")
    try:  # a real write test: permissions, read-only mounts and ACLs alike (os.access ignores some)
        tempfile.TemporaryDirectory(dir=parent, prefix=".dynheads-check-").cleanup()
    except OSError as exc:
        raise ConfigError(f"{flag} {named}: cannot write in {parent} ({exc.strerror})") from None


def result_name(name: str, config: Any, ignore: tuple[str, ...] = ("threads",)) -> str:
    """`name` plus `__field=value` for each field of the dataclass `config` that is not at its default
    (cca__max_offset=3); with every flag at its default the name stays plain (cca)."""
    parts = []
    for f in dataclasses.fields(config):
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = getattr(config, f.name)
        if f.name not in ignore and value != default:
            parts.append(f"{f.name}={_short(value)}")
    return "__".join([name, *parts])


def _short(value: Any) -> str:
    """A flag value as part of a file name; paths and long values keep their stem and a short hash."""
    text = str(value)
    if "/" in text or len(text) > 24:
        text = f"{Path(text).stem[:16]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return safe_name(text)


def _busy(path: Path) -> str:
    return (f"{path} is being written by another dynheads process{FolderLock.owner(path)}; "
            "wait for it to finish, or use another --out")


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is empty or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


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
