"""``fedsilo aggregator``: rank 0 of a federation."""

from __future__ import annotations

import typer

from fedsilo.join import read_token
from fedsilo.options import settings_of


def command(ctx: typer.Context) -> None:
    """Run the aggregator (rank 0): admit K silos, run the rounds, average, evaluate, log to MLflow.

    Start it first, then one `fedsilo silo --rank R` per silo (R = 1..K) with the same settings and --aggregator HOST:PORT pointing here.
    """
    from fedsilo import aggregator

    settings = settings_of(ctx)
    aggregator.serve(settings, read_token(settings.federation.token_file))
