"""`dynheads sweep`: a grid of model-running commands from a TOML SPEC, locally or on Ray."""
from __future__ import annotations

from pathlib import Path

import typer

_RAY_HELP = """Run a grid of experiments from a TOML SPEC: one ordinary run folder per cell under --out.

Without --ray the cells run here, one after another. With --ray (after SPEC) every sample is a
Ray task on --workers actors that each hold the model once: `--ray` alone starts a local Ray
instance on 127.0.0.1; `--ray ADDRESS` (e.g. `--ray auto` on a node of a `ray start --head`
cluster) joins an existing one. Rerunning the same command resumes every cell.
"""


def register(app: typer.Typer) -> None:
    @app.command(help=_RAY_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def sweep(
        ctx: typer.Context,
        spec: Path = typer.Argument(..., help="TOML file: models × experiments × parameters × seeds"),
        out: Path = typer.Option(..., help="sweep folder; each cell is a run folder inside it"),
        workers: int = typer.Option(2, help="with --ray: actors, each holding the model once"),
        gpus_per_worker: float = typer.Option(0.0, help="with --ray: GPUs per actor (Ray num_gpus)"),
        cpus_per_worker: float = typer.Option(1.0, help="with --ray: CPUs per actor (Ray num_cpus)"),
        quiet: bool = typer.Option(False),
    ):
        import os

        from dynheads.runs import check_out
        from dynheads.sweep.run import RayOptions, run_sweep
        from dynheads.sweep.spec import load_spec

        address, use_ray = _ray_flag(ctx.args)
        cells = load_spec(spec)
        check_out(out)
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)  # the global --threads, also for every actor
        ray = RayOptions(address, workers, gpus_per_worker, cpus_per_worker) if use_ray else None
        run_sweep(cells, out, ray, threads, quiet, on_cell=lambda cell, path: typer.echo(f"{cell.name}: {path}"))
        typer.echo(str(out))


def _ray_flag(args: list[str]) -> tuple[str | None, bool]:
    """(address, on Ray?) from the extra arguments: `--ray`, `--ray ADDRESS` or `--ray=ADDRESS`."""
    from dynheads.errors import ConfigError

    rest = list(args)
    address, use_ray = None, False
    while rest:
        arg = rest.pop(0)
        if arg == "--ray":
            use_ray = True
            if rest and not rest[0].startswith("-"):
                address = rest.pop(0)
        elif arg.startswith("--ray="):
            use_ray, address = True, arg.split("=", 1)[1] or None
        else:
            raise ConfigError(f"unexpected argument '{arg}' (sweep takes SPEC, --out, --ray [ADDRESS] and the flags "
                              "in --help)")
    return address, use_ray
