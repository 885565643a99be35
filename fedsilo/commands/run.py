"""``fedsilo run``: the aggregator and K silos as local child processes."""

from __future__ import annotations

from typing import Annotated

import typer

from fedsilo.config import Settings
from fedsilo.launcher import run_local
from fedsilo.options import with_settings


@with_settings
def command(
    settings: Settings,
    restarts: Annotated[int, typer.Option(
        "--restarts", envvar="FEDSILO_RESTARTS", min=0,
        help="Restart the federation this many times after a failure; it resumes from the last checkpoint.")] = 0,
) -> None:
    """Run a whole federation on this machine: the aggregator and K silos (K = --silos) as child processes, output prefixed by role.

    Example: fedsilo run --silos 4 --model ./minilm --dataset data/rotten_tomatoes.csv --rounds 3
    """
    run_local(settings, restarts)
