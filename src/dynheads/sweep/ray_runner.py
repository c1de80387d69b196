"""Samples as Ray tasks on actors that hold the model; the driver alone writes the run folder.

A `RayPool` starts one actor per worker (`num_gpus`/`num_cpus` per actor from flags); each loads
the model once. `RayPool.runner(driver_lm)` has the signature of `tracing.runner.run_samples`, so
every experiment runs unchanged: the driver builds the run folder, its config and its samples
with a weightless copy of the model (meta device), and ships the experiment's per-sample work
function to the actors once per run. While pickling it, every reference to the driver's model
(the LoadedModel, its module and tokenizer, and Tracers over it) is replaced by a placeholder
that each actor resolves to its own loaded model. No actor reads or writes the run folder or an
input file: work that needs per-sample data from the run folder (`SampleWorkWithInputs`, e.g. the
ablation's first pass) has it read by the driver and sent with each sample, and work that holds a
RunDir is refused before any actor starts. Finished samples come back to the driver, which writes
them with the same atomic per-sample rule as a local run; a worker that dies has its unfinished
samples handed to the others, and a rerun finishes whatever is missing.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import sys
from collections import deque
from typing import Any, Iterable

from dynheads.errors import DynheadsError

log = logging.getLogger(__name__)
IN_FLIGHT = 2  # samples queued per actor, so an actor never waits for the driver's write


def connect(address: str | None, num_cpus: int) -> None:
    """Join the cluster at `address`, or start a local Ray instance bound to 127.0.0.1 only."""
    if not address:
        # Ray resolves 127.0.0.1 to the host's reachable IP (and its servers bind to it) unless cluster
        # mode is off; read once when ray is imported, and inherited by every process it starts.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise DynheadsError("--ray needs Ray: pip install 'dynheads[ray]'") from None

    if address:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level=logging.ERROR)
    if ray.util.get_node_ip_address() != "127.0.0.1":  # ray was imported before the variable was set
        ray.shutdown()
        raise DynheadsError("a local Ray instance would not be bound to 127.0.0.1 only: import ray after "
                            "setting RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, or start one with `ray start --head`")


class SampleWorker:
    """A Ray actor: one loaded model; runs shipped per-sample work functions on samples."""

    def __init__(self, model, threads: int):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.lm = model.load(weights=True)
        self._work: dict[str, Any] = {}

    def ready(self) -> int:
        return os.getpid()

    def run(self, blob: bytes, key: str, encoded, *inputs) -> tuple[dict, dict]:
        """One sample; `inputs`: what the driver read for it (SampleWorkWithInputs), else nothing."""
        if key not in self._work:
            self._work = {key: load_work(blob, self.lm)}  # one run at a time per actor
        return self._work[key](encoded, *inputs)


class RayPool:
    """Actors holding one model, and the runner that feeds them samples."""

    def __init__(self, model, workers: int, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                 threads: int = 1):
        if workers < 1:
            raise DynheadsError("--workers must be at least 1")
        self.model, self.threads, self.workers = model, threads, workers
        self.resources = {"num_gpus": gpus_per_worker, "num_cpus": cpus_per_worker}
        self.actors: list = []
        self.started = False  # actors start with the first run that has unfinished samples

    def start(self) -> None:
        """Start the actors; each loads the model once (a model that fails to load surfaces here)."""
        import ray

        actor = ray.remote(SampleWorker).options(max_restarts=0, **self.resources)
        self.actors = [actor.remote(self.model, self.threads) for _ in range(self.workers)]
        self.started = True
        try:
            _get(ray, [a.ready.remote() for a in self.actors])
        except ray.exceptions.RayActorError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DynheadsError(f"a Ray worker could not load {self.model.source}: {first}") from None

    def close(self) -> None:
        """End the actors now (their handles going out of scope would end them later)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def runner(self, driver_lm):
        """A `run_samples`-compatible runner whose work runs on the actors."""

        def run_samples(run, samples: Iterable, work, total: int | None = None, quiet: bool = False) -> int:
            return self.run_samples(driver_lm, run, samples, work, total, quiet)

        return run_samples

    def run_samples(self, driver_lm, run, samples: Iterable, work, total: int | None = None,
                    quiet: bool = False) -> int:
        """Send every unfinished sample to an actor; write each result as it returns."""
        import ray
        from ray.exceptions import RayActorError
        from tqdm import tqdm

        from dynheads.tracing.runner import SampleWorkWithInputs, interrupted, write_sample

        done = run.done_samples()
        queue = deque((order, enc) for order, enc in enumerate(samples) if enc.sample.id not in done)
        if not queue:
            return 0
        read_inputs = work.read_inputs if isinstance(work, SampleWorkWithInputs) else None
        shipped = work.work if read_inputs is not None else work
        blob = dump_work(shipped, driver_lm)  # before any actor starts: work that cannot be shipped fails fast
        if not self.started:
            self.start()
        key, ref = hashlib.sha256(blob).hexdigest(), ray.put(blob)
        load = {a: 0 for a in self.actors}
        flight: dict[Any, tuple[Any, int, Any]] = {}
        n_run, last = 0, None
        bar = tqdm(total=len(queue), desc=run.path.name, unit="sample", file=sys.stderr, disable=quiet, leave=False)
        try:
            while queue or flight:
                while queue and min(load.values()) < IN_FLIGHT:  # round-robin: the least loaded actor first
                    a = min(load, key=load.get)
                    order, enc = queue.popleft()
                    inputs = () if read_inputs is None else (read_inputs(enc),)  # read here, sent with the sample
                    flight[a.run.remote(ref, key, enc, *inputs)] = (a, order, enc)
                    load[a] += 1
                ready, _ = ray.wait(list(flight), num_returns=1)
                a, order, enc = flight.pop(ready[0])
                try:
                    arrays, result = _get(ray, ready[0])
                except RayActorError:
                    self._drop(a, load, flight, queue)
                    queue.appendleft((order, enc))
                    continue
                load[a] -= 1
                write_sample(run, order, enc, arrays, result)
                n_run, last = n_run + 1, enc.sample.id
                bar.update(1)
        except KeyboardInterrupt:  # samples in flight are lost; every written one is kept
            bar.close()
            raise interrupted(run, len(done) + n_run, total, n_run, last) from None
        finally:
            bar.close()
        return n_run

    def _drop(self, actor, load: dict, flight: dict, queue: deque) -> None:
        """Forget a dead actor; its other queued samples go back to the front of the queue."""
        load.pop(actor, None)
        if actor in self.actors:
            self.actors.remove(actor)
            log.warning("a Ray worker died; %d workers left", len(self.actors))
        for ref, (a, order, enc) in list(flight.items()):
            if a is actor:
                del flight[ref]
                queue.appendleft((order, enc))
        if not self.actors:
            raise DynheadsError(f"all Ray workers died; finished samples are kept ({len(queue) + 1} left): "
                                "rerun the same command to resume")


def dump_work(work, driver_lm) -> bytes:
    """Pickle a per-sample work function with the driver's model replaced by placeholders.

    Work holding a run folder is refused: an actor must not need the driver's disk.
    """
    from ray import cloudpickle

    from dynheads.runs import RunDir
    from dynheads.tracing.tracer import Tracer

    class DriverPickler(cloudpickle.Pickler):
        def persistent_id(self, obj):
            if obj is driver_lm:
                return "lm"
            if obj is driver_lm.model:
                return "model"
            if obj is driver_lm.tokenizer:
                return "tokenizer"
            if isinstance(obj, Tracer) and obj.lm is driver_lm:
                return ("tracer", obj.config)
            if getattr(obj, "is_meta", False):
                raise DynheadsError("a per-sample work function holds a weightless (meta) tensor of the driver; "
                                    "it can only run locally")
            if isinstance(obj, RunDir):
                raise DynheadsError(f"a per-sample work function holds the run folder {obj.path}; a Ray worker "
                                    "must not read it (read per-sample data on the driver: SampleWorkWithInputs)")
            return None

    buf = io.BytesIO()
    DriverPickler(buf, protocol=5).dump(work)
    return buf.getvalue()


def load_work(blob: bytes, lm):
    """Unpickle a work function onto this process's loaded model."""
    from dynheads.tracing.tracer import Tracer

    class WorkerUnpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            if isinstance(pid, tuple) and pid[0] == "tracer":
                return Tracer(lm, pid[1])
            return {"lm": lm, "model": lm.model, "tokenizer": lm.tokenizer}[pid]

    return WorkerUnpickler(io.BytesIO(blob)).load()


def _get(ray, refs):
    """ray.get, with an error raised inside a task re-raised as itself (one-line errors stay one line)."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
