"""Installed in every Ray worker process of the Ray sweep tests (runtime_env `worker_process_setup_hook`).

The tests' actors run in another working folder (runtime_env `working_dir`, where this file is
copied) and, through this guard, cannot see the driver's folder either:
- any file operation under $DYNHEADS_TEST_DRIVER_ROOT (the driver's working folder: its run
  folders and input files) raises PermissionError and is written to $DYNHEADS_TEST_WORKER_LOG as
  `touched PID EVENT PATH`; reading, listing, creating, renaming or removing there all count;
- every sample an actor starts and finishes is written to the same log as `start PID SAMPLE_ID`
  and `done PID SAMPLE_ID`, so a test sees which worker held a sample when it was killed and where
  the sample ran again.
Stdlib only, plus the SampleWorker class it wraps.
"""
import os
import sys

# Audit events (https://docs.python.org/3/library/audit_events.html) whose first arguments are paths.
FILE_EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod",
               "os.utime", "os.truncate", "os.link", "os.symlink", "os.chdir", "shutil.copyfile", "shutil.rmtree",
               "shutil.move", "glob.glob"}


def install() -> None:
    """Refuse and log file operations under the driver's folder; log each sample's start and end."""
    root = os.path.realpath(os.environ["DYNHEADS_TEST_DRIVER_ROOT"])
    log_path = os.environ["DYNHEADS_TEST_WORKER_LOG"]

    def write(line: str) -> None:
        with open(log_path, "a") as log:  # this open is audited too: the log lies outside the root
            log.write(line + "\n")

    def under_root(arg) -> str | None:
        if not isinstance(arg, (str, bytes, os.PathLike)):
            return None  # file descriptors, modes, flags
        path = os.path.realpath(os.fsdecode(arg))  # relative paths: from this worker's own folder
        return path if path == root or path.startswith(root + os.sep) else None

    def guard(event: str, args: tuple) -> None:
        if event not in FILE_EVENTS:
            return
        for arg in args[:2]:
            path = under_root(arg)
            if path is not None:
                write(f"touched {os.getpid()} {event} {path}")
                raise PermissionError(f"a Ray worker touched the driver's folder: {event} {path}")

    sys.addaudithook(guard)

    from dynheads.sweep import ray_runner

    run = ray_runner.SampleWorker.run

    def logged_run(self, blob, key, encoded, *inputs):
        write(f"start {os.getpid()} {encoded.sample.id}")
        out = run(self, blob, key, encoded, *inputs)
        write(f"done {os.getpid()} {encoded.sample.id}")
        return out

    ray_runner.SampleWorker.run = logged_run
