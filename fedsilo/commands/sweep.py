"""``fedsilo sweep``: a grid of simulations under one MLflow parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsilo.options import stop_on_sigterm


def command(
    config: Annotated[
        Path, typer.Option("--config", envvar="FEDSILO_SWEEP", help="Sweep YAML file (see configs/sweep-example.yaml).")
    ],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate the file and list its cells; train nothing and touch no MLflow store."
        ),
    ] = False,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="A dry run that also times a few batches of each model and dataset here and estimates each "
            "cell's time (trains a little; records nothing).",
        ),
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            min=1,
            envvar="FEDSILO_SWEEP_JOBS",
            help="Cells to run at once, each in its own process: several small simulations fill one GPU. "
            "Default: the sweep file's `jobs`, else 1.",
        ),
    ] = None,
) -> None:
    """Run a grid of simulations (models x datasets x client counts x seeds ...) as nested MLflow runs under one parent.

    Any settings key may be a list under `grid:`; each cell is one `fedsilo simulate` run. Restarting the same sweep reuses its parent run and skips the cells that already finished. Afterwards: fedsilo report --experiment NAME.
    """
    from fedsilo.sweep import run_sweep

    with stop_on_sigterm():
        run_sweep(config, dry_run=dry_run or estimate, estimate=estimate, jobs=jobs)
