"""``fedsilo run``: the aggregator and K silos as local child processes."""

from __future__ import annotations

from typing import Annotated

import typer

from fedsilo.launcher import run_local
from fedsilo.options import settings_of, whole_number


def command(
    ctx: typer.Context,
    restarts: Annotated[
        int,
        whole_number(
            "--restarts",
            minimum=0,
            envvar="FEDSILO_RESTARTS",
            help="Restart the federation this many times after a failure, at least 0; it resumes from the last "
            "checkpoint.",
        ),
    ] = 0,
) -> None:
    """Run a whole federation on this machine: the aggregator and K silos (K = --silos) as child processes, output prefixed by role.

    Example: fedsilo run --silos 4 --model ./minilm --dataset data/rotten_tomatoes.csv --rounds 3
    """
    run_local(settings_of(ctx), restarts)
