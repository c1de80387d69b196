"""Per-step records: the contract between traced generation and every analysis.

One file per sample, `records/<sample_id>.npz`, one row per generated token. Array names and
axis order are fixed (per-head arrays are `[steps, layers, heads]`):

  token_id        [T]          generated (kept) token
  token_entropy   [T]          entropy (nats) of the next-token distribution that produced it
  token_logprob   [T]          log-probability of the kept token
  top1_pos        [T, L, H]    argmax position of each head's attention row (newest query)
  top1_token      [T, L, H]    token id at that position
  mass_<span>     [T, L, H]    attention mass on a named span (e.g. mass_needle, mass_support)
  context_mass    [T, L, H]    mass on positions outside attention sinks and the local window (Eq. 2 denominator)
  rows_<span>     [T, L, H, n] attention weights over the span's n positions (when requested)
  score           [T, L, H]    the run's head retrieval score (Eq. 1 binary for NIAH, Eq. 2 for multi-hop)
  hidden          [T, d]       final hidden state of the step (post final norm: the input of the LM head)
  ablated         [T, L, H]    heads masked at the step (intervention runs only), plus masked_* arrays
                               of the masked pass and clean_token_id (token of the unmasked pass)

`load_records(run_dir)` concatenates all finished samples in sample order.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynheads.errors import DataError
from dynheads.files import temp_path


@dataclass
class Records:
    """Records of a run: arrays concatenated over samples along axis 0, with their sample and step."""

    arrays: dict[str, np.ndarray]
    sample_ids: np.ndarray  # [N] str
    step: np.ndarray  # [N] int

    def __len__(self) -> int:
        return len(self.step)

    @property
    def names(self) -> list[str]:
        return sorted(self.arrays)

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise DataError(f"records have no '{name}' (have: {', '.join(self.names)})")
        return self.arrays[name]

    def hidden(self) -> np.ndarray:
        if "hidden" not in self.arrays:
            raise DataError("this run recorded no hidden states (trace with --record-hidden)")
        return self.arrays["hidden"]

    def samples(self) -> list[str]:
        """Sample ids in record order, each once."""
        _, first = np.unique(self.sample_ids, return_index=True)
        return [str(self.sample_ids[i]) for i in sorted(first)]

    def select(self, mask: np.ndarray) -> "Records":
        return Records({k: v[mask] for k, v in self.arrays.items()}, self.sample_ids[mask], self.step[mask])

    def by_sample(self) -> dict[str, "Records"]:
        return {sid: self.select(self.sample_ids == sid) for sid in self.samples()}


def save_sample_records(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one sample's arrays atomically (a temporary name unique to this write, then rename)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:  # a file object: numpy appends no `.npz` to the temporary name
            np.savez_compressed(f, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_sample_records(path: Path) -> dict[str, np.ndarray]:
    """One sample's arrays; a missing, empty or damaged file is a one-line DataError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"records file {path} is missing or damaged ({type(exc).__name__}); rerun the command "
                        "that wrote this run to redo that sample") from None


def concat_records(per_sample: list[tuple[str, dict[str, np.ndarray]]]) -> Records:
    """Concatenate per-sample arrays; samples with zero steps contribute nothing."""
    if not per_sample:
        raise DataError("no finished samples with records")
    names = set(per_sample[0][1])
    for sid, arrs in per_sample:
        names &= set(arrs)
    arrays = {n: np.concatenate([a[n] for _, a in per_sample], axis=0) for n in sorted(names)}
    lengths = [len(a["token_id"]) for _, a in per_sample]
    sample_ids = np.concatenate([np.full(n, sid, dtype=object) for (sid, _), n in zip(per_sample, lengths)])
    step = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    return Records(arrays, sample_ids.astype(str), step)


def load_records(run_dir) -> Records:
    """All finished samples' records of a run folder (path or RunDir), in sample order."""
    from dynheads.runs import RunDir

    run = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    return run.read_records()
