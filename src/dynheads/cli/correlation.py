"""Claim 3 analyses of a traced run (no model needed): temporal-offset CCA and the MLP probe."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def cca(
        run_dir: Path = typer.Argument(..., help="a traced run folder with hidden states"),
        max_offset: int = typer.Option(10, min=0, help="offsets k = 0..max-offset (steps ahead)"),
        seed: int = typer.Option(0, help="seed of the split by sample, shuffles and bootstrap"),
        train_fraction: float = typer.Option(0.7, help="fraction of samples that fit the held-out CCA"),
    ):
        """Fig. 4: canonical correlation of the hidden state at n with all heads' scores at n + k."""
        from dynheads.analyses import cca as cca_exp
        from dynheads.runs import RunDir

        run = RunDir.open(run_dir)
        result = cca_exp.run(run, cca_exp.CcaConfig(max_offset=max_offset, train_fraction=train_fraction,
                                                     seed=seed, threads=0))  # threads: the global --threads
        typer.echo(cca_exp.format_cca_table(result))
        typer.echo(str(run.path))

    @app.command()
    def probe(
        run_dir: Path = typer.Argument(..., help="a traced run folder with hidden states"),
        offset: int = typer.Option(0, min=0, help="predict the heads of step n + offset from the state at n"),
        regress: bool = typer.Option(False, help="regress continuous (Eq. 2) scores, Table 3"),
        paper_sizes: bool = typer.Option(False, help="hidden layers 8192, 4096, 4096 (paper) instead of 2d, d, d"),
        seed: int = typer.Option(0, help="seed of the split by sample, training and bootstrap"),
        max_epochs: int = typer.Option(100, min=1, help="upper bound; training stops early on validation loss"),
        patience: int = typer.Option(5, min=1, help="early-stopping patience in epochs"),
    ):
        """Table 2/3: MLP probe from the final hidden state to per-head scores, with baselines.

        A head is active where its score exceeds the run's registered head-score threshold (Eq. 1: 0.5
        on a 0/1 score; Eq. 2: 0.1). Baselines: linear probe (ridge for --regress), shuffled labels,
        frequency prior, position, copy step (knows when the model copies, not which heads), last set.
        """
        from dynheads.analyses import probe_table
        from dynheads.analyses.probes import ProbeConfig
        from dynheads.runs import RunDir

        run = RunDir.open(run_dir)
        config = ProbeConfig(offset=offset, regress=regress, paper_sizes=paper_sizes, seed=seed,
                             max_epochs=max_epochs, patience=patience, threads=0)  # the global --threads
        typer.echo(probe_table.format_probe_table(probe_table.run(run, config)))
        typer.echo(str(run.path))
