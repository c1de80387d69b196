"""The `dynheads` command line: thin commands that build a config, call the API and print results.

stdout carries results (tables, then the run folder on the last line); progress goes to stderr.
Bad input prints `error: <one line>` and exits 2; a traceback appears only with --debug.
"""
from __future__ import annotations

import logging
import os
import sys

import typer

from dynheads.errors import DynheadsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Token-by-token retrieval heads of causal LMs ('Retrieval Heads are Dynamic').")


def _register_all() -> None:
    from dynheads.cli import trace as trace_cmds

    trace_cmds.register(app)
    trace_cmds.register_list(app)
    for name in ("correlation", "ablation", "rag", "conformance"):
        try:
            module = __import__(f"dynheads.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"dynheads.cli.{name}":
                raise
            continue
        module.register(app)


_register_all()


def main() -> None:
    """Entry point: run the app and turn DynheadsErrors into one-line errors."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except DynheadsError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except KeyboardInterrupt:
        print("error: interrupted (finished samples are kept; rerun the same command to resume)", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal failure: {type(exc).__name__}: {first} (rerun with --debug)", file=sys.stderr)
        sys.exit(1)
