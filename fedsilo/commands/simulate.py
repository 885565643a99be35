"""``fedsilo simulate``: K clients in one process, one after another, on one device."""

from __future__ import annotations

from typing import Annotated

import typer

from fedsilo.config import Settings
from fedsilo.options import stop_on_sigterm, with_settings


@with_settings
def command(
    settings: Settings,
    clients: Annotated[str | None, typer.Option(
        "--clients", envvar="FEDSILO_CLIENTS", metavar="INTEGER",
        help="Number of clients K, at least 1 (overrides --silos).")] = None,
) -> None:
    """Simulate a federation of K clients in this process: the same local training, seeds, shards and averaging as `fedsilo run`, so the same global model, without the network.

    Memory holds one model whatever K is. Example: fedsilo simulate --clients 8 --model ./minilm --dataset data/rotten_tomatoes.csv --rounds 3
    """
    from fedsilo.simulate import simulate

    if clients is not None:  # validated as the silos setting it overrides: one line if bad
        settings = settings.replace(silos=clients)
    with stop_on_sigterm():
        simulate(settings)
