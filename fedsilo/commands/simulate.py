"""``fedsilo simulate``: K clients in one process, one after another, on one device."""

from __future__ import annotations

from typing import Annotated

import typer

from fedsilo.options import parse_as, settings_of, stop_on_sigterm


def command(
    ctx: typer.Context,
    clients: Annotated[
        int | None,
        typer.Option(
            "--clients",
            envvar="FEDSILO_CLIENTS",
            parser=parse_as("silos"),  # a bad value reads as a bad --silos
            help="Number of clients K, at least 1 (overrides --silos).",
        ),
    ] = None,
) -> None:
    """Simulate a federation of K clients in this process: the same local training, seeds, shards and averaging as `fedsilo run`, so the same global model, without the network.

    Memory holds one model whatever K is. Example: fedsilo simulate --clients 8 --model ./minilm --dataset data/rotten_tomatoes.csv --rounds 3
    """
    from fedsilo.simulate import simulate

    settings = settings_of(ctx)
    if clients is not None:
        settings = settings.replace(silos=clients)
    with stop_on_sigterm():
        simulate(settings)
