"""The `dynheads` command line: thin commands that build a config, call the API and print results.

stdout carries results (tables, then the run folder on the last line); progress goes to stderr.
Bad input, usage errors included, prints `error: <one line>` and exits 2; Ctrl-C exits 130 and says
what finished; a traceback appears only with --debug. Commands import torch and transformers inside
their bodies, so --help, `list` and input errors answer without loading them.
"""
from __future__ import annotations

import logging
import os
import sys

try:
    import typer
    from typer.exceptions import TyperException
except KeyboardInterrupt:  # Ctrl-C while the command line itself is imported: no traceback
    print("error: interrupted while starting", file=sys.stderr)
    sys.exit(130)

from dynheads.errors import DynheadsError

GLOBAL_FLAGS = ("--threads",)  # project-wide options, accepted before or after the command name
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Token-by-token retrieval heads of causal LMs ('Retrieval Heads are Dynamic').")


@app.callback()
def _entry(threads: int = typer.Option(
        0, "--threads", min=0, help="torch and BLAS CPU threads for every command (0: the libraries' default, "
        "one per core or $OMP_NUM_THREADS); 1 is fastest on cores shared with other jobs")):
    """Project-wide options, applied once before any command imports torch."""
    if threads:
        set_threads(threads)


def set_threads(n: int) -> None:
    """Intra-op threads of torch and the BLAS libraries: set in the environment before they are imported
    (they read it once, at import; torch caps it at the core count), or directly if torch is loaded."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _register_all() -> None:
    from dynheads.cli import trace as trace_cmds

    trace_cmds.register(app)
    trace_cmds.register_list(app)
    for name in ("correlation", "ablation", "rag", "conformance", "report", "sparse", "sweep"):
        try:
            module = __import__(f"dynheads.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"dynheads.cli.{name}":
                raise
            continue
        module.register(app)


_register_all()


def main() -> None:
    """Entry point: run the app; turn every user error into one `error:` line and its exit code."""
    args = sys.argv[1:]
    debug = "--debug" in args
    args = _hoist_global_flags([a for a in args if a != "--debug"])
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(args, prog_name="dynheads", standalone_mode=False)
    except DynheadsError as exc:  # bad input (2) or an interrupted run (130)
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except TyperException as exc:  # usage errors; typer ships its own click, so these are its classes
        _fail(_usage_message(exc), getattr(exc, "exit_code", 2) or 2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted (finished samples are kept; rerun the same command to resume)", 130)
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"internal failure: {type(exc).__name__}: {first} (rerun with --debug)", 1)
    if code == 130:  # typer turns Ctrl-C outside a sample loop (imports, model load, analyses) into 130
        _fail("interrupted (finished samples are kept; rerun the same command to resume)", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _usage_message(exc: TyperException) -> str:
    """One line for a usage error, with where to find help."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # typer has already printed the help on stdout
        return "no command given; choose one of the commands listed above"
    text = " ".join(exc.format_message().split()).rstrip(".") or type(exc).__name__
    path = ctx.command_path if ctx is not None else "dynheads"
    return f"{text[0].lower()}{text[1:]} (see `{path} --help`)"


def _hoist_global_flags(args: list[str]) -> list[str]:
    """Move project-wide flags given after the command name to the front, where typer reads them."""
    front, rest, i = [], [], 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in GLOBAL_FLAGS and "=" not in args[i] and i + 1 < len(args):
            front += args[i:i + 2]
            i += 2
            continue
        (front if name in GLOBAL_FLAGS else rest).append(args[i])
        i += 1
    return front + rest
