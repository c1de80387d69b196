"""Safe file handling shared by run folders and the converted-model cache.

- `temp_path` / `atomic_write`: write under a unique temporary name (pid + random) and rename into
  place, so neither a reader nor a second writer ever sees a half-written file;
- `remove_stale_temps`: delete temporaries whose writing process no longer runs (a killed run);
- `FolderLock`: an exclusive `flock` on `<folder>/.lock`; the kernel drops it when the process dies,
  so a killed run never leaves a stale lock behind;
- `fingerprint`: the resolved path and a content hash of an input file or folder, stored in run
  configs so a resumed run cannot mix inputs.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import weakref
from pathlib import Path

from dynheads.errors import DataError

LOCK_NAME = ".lock"
# `name.tmp<pid>-<hex>`; older versions wrote `name.tmp<pid>` and `name.tmp.npz`.
_TEMP = re.compile(r"\.tmp(\d*)(-[0-9a-f]+)?(\.|$)")


def temp_path(path: Path) -> Path:
    """A unique sibling of `path` to write before renaming; its name never matches `*.json` or `*.npz`,
    so readers that list finished files never see it."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: Path, text: str) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporaries in `folder` left by processes that no longer run; returns what was removed."""
    removed = []
    for p in Path(folder).iterdir() if Path(folder).is_dir() else ():
        m = _TEMP.search(p.name)
        if not m or (m.group(1) and _alive(int(m.group(1)))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass  # another cleaner got there first, or a read-only folder: harmless
    return removed


class FolderLock:
    """An exclusive lock on a folder, held while this object (or the process) lives.

    One process may take the same folder's lock more than once (a run resumed in-process): it gets
    the lock it already holds.
    """

    _held: "weakref.WeakValueDictionary[str, FolderLock]" = weakref.WeakValueDictionary()

    def __init__(self, fd: int, path: Path):
        self._fd, self.path = fd, path

    @classmethod
    def acquire(cls, folder: Path, wait: bool = False) -> "FolderLock | None":
        """The lock, or None when another process holds it (`wait=True` blocks until it is free)."""
        path = Path(folder) / LOCK_NAME
        key = str(path.resolve())
        held = cls._held.get(key)
        if held is not None:
            return held
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        lock = cls._held[key] = cls(fd, path)
        return lock

    @staticmethod
    def owner(folder: Path) -> str:
        """' (pid N)' of the process that holds (or last held) the folder's lock, or ''."""
        try:
            pid = (Path(folder) / LOCK_NAME).read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

    def __del__(self):
        self.release()


def resolved(path: str | os.PathLike | None) -> str | None:
    """An input path as an absolute, symlink-free string (None stays None): what run configs store."""
    return None if path is None else str(Path(path).expanduser().resolve())


def fingerprint(path: str | os.PathLike, pattern: str = "*") -> dict[str, str]:
    """{"path": resolved path, "sha256": content hash} of a file, or of a folder's files matching `pattern`
    (names and contents), so a resumed run can tell the same input from another one at the same path."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise DataError(f"input {p} does not exist")
    h = hashlib.sha256()
    files = sorted(f for f in p.glob(pattern) if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() + b"\0" if p.is_dir() else b"")
        h.update(sha256_file(f).encode())
    return {"path": str(p), "sha256": h.hexdigest()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
