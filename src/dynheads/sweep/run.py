"""Run a sweep's cells: locally in order, or with every sample a Ray task (ray_runner.py).

Each cell calls the same function as the command it names (commands.py) with the model loaded
once per model: locally the weights live in this process; on Ray each actor holds them and this
process (the driver) keeps a weightless copy for configs and samples, and alone writes the runs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dynheads.commands import commands
from dynheads.sweep.spec import Cell


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray sweep runs."""

    address: str | None = None  # an existing cluster ("auto", "HOST:PORT"); None = a local instance on 127.0.0.1
    workers: int = 2  # actors, each holding the model once
    gpus_per_worker: float = 0.0  # Ray num_gpus per actor (a fraction packs several actors on one GPU)
    cpus_per_worker: float = 1.0  # Ray num_cpus per actor


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """An explicit `HOST:PORT` (or `ray://HOST:PORT`) must accept a TCP connection within `timeout` seconds.

    Ray itself retries an unreachable address for minutes, printing connection warnings and no error.
    `auto` is resolved as Ray resolves it and then probed; a local instance (None) needs no probe.
    """
    import socket

    from dynheads.errors import ConfigError

    if not address or address == "local":
        return
    target = address
    if address == "auto":  # the address Ray would pick (`ray start`'s record, or a running GCS process)
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:  # no Ray, or another version: ray_runner.connect says so
            return
        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise ConfigError(f"--ray auto: {str(exc).strip().splitlines()[0]}") from None
    host, sep, port = target.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray {address}: give the HOST:PORT of a Ray head (e.g. 10.0.0.5:6379), or 'auto' "
                          "on a node of a running cluster")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        at = "" if target == address else f" (found at {target})"
        raise ConfigError(f"--ray {address}: no Ray head reachable{at} within {timeout:g} s ({why}); start one "
                          "with `ray start --head` or check the address") from None


def check_cells(cells: list[Cell]) -> None:
    """Every cell's parameters, before any model loads (one-line errors name the cell)."""
    from dynheads.errors import DynheadsError

    for cell in cells:
        try:
            commands.get(cell.experiment).check(**cell.params)
        except DynheadsError as exc:
            raise type(exc)(f"sweep cell {cell.name}: {exc}") from None


def run_sweep(cells: list[Cell], out: str | Path, ray: RayOptions | None = None, threads: int = 0,
              quiet: bool = False, on_cell: Callable[[Cell, Path], None] | None = None) -> list[Path]:
    """Run every cell into `out/<cell name>` (resuming finished samples); returns the run folders."""
    check_cells(cells)
    owned = ray is not None and not _ray_connected()  # a caller's connection (tests, notebooks) is kept
    if owned:
        check_ray_address(ray.address)  # before torch and Ray load: an unreachable address fails in seconds
    out = Path(out)
    folders = []
    if ray is not None and threads <= 0:  # an actor's default: one torch thread per CPU Ray gives it
        threads = max(1, int(ray.cpus_per_worker))
    if threads > 0:  # here too on Ray, so each run's config records the threads its samples ran with
        import torch

        torch.set_num_threads(threads)
    if owned:
        from dynheads.errors import ConfigError
        from dynheads.sweep import ray_runner

        try:
            ray_runner.connect(ray.address, num_cpus=max(1, int(ray.workers * ray.cpus_per_worker)))
        except ConnectionError as exc:  # e.g. `--ray auto` with no running cluster
            raise ConfigError(f"--ray {ray.address}: {str(exc).strip().splitlines()[0]}") from None
    try:
        for model, group in itertools.groupby(cells, key=lambda c: c.model):
            lm, runner, pool = _model_runner(model, ray, threads)
            try:
                for cell in group:
                    command = commands.get(cell.experiment)
                    command.run(lm, out / cell.name, quiet=quiet, runner=runner, **cell.params)
                    folders.append(out / cell.name)
                    if on_cell is not None:
                        on_cell(cell, out / cell.name)
            finally:
                if pool is not None:  # this model's actors end before the next model's start
                    pool.close()
    finally:
        if owned:
            import ray as ray_lib

            ray_lib.shutdown()
    return folders


def _ray_connected() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _model_runner(model, ray: RayOptions | None, threads: int):
    """(model for the driver, runner, pool): real weights and run_samples locally; on Ray a meta copy."""
    if ray is None:
        from dynheads.tracing.runner import run_samples

        return model.load(weights=True), run_samples, None
    from dynheads.sweep.ray_runner import RayPool

    lm = model.load(weights=False)  # model errors (missing file, bad source) fail here, before any actor
    pool = RayPool(model, ray.workers, ray.gpus_per_worker, ray.cpus_per_worker, threads)
    return lm, pool.runner(lm), pool
