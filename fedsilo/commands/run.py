"""``fedsilo run``: the aggregator and K silos as local child processes."""

from __future__ import annotations

from typing import Annotated

import typer

from fedsilo.config import Settings
from fedsilo.launcher import run_local
from fedsilo.options import whole_number, with_settings


@with_settings
def command(
    settings: Settings,
    restarts: Annotated[str, typer.Option(
        "--restarts", envvar="FEDSILO_RESTARTS", metavar="INTEGER",
        help="Restart the federation this many times after a failure, at least 0; it resumes from the last "
             "checkpoint. [default: 0]")] = "0",
) -> None:
    """Run a whole federation on this machine: the aggregator and K silos (K = --silos) as child processes, output prefixed by role.

    Example: fedsilo run --silos 4 --model ./minilm --dataset data/rotten_tomatoes.csv --rounds 3
    """
    run_local(settings, whole_number(restarts, "--restarts", minimum=0) or 0)
