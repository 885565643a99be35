"""``fedsilo silo``: one of ranks 1..K."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fedsilo.errors import ConfigError
from fedsilo.join import read_token
from fedsilo.options import SettingsCommand, settings_of, whole_number


class SiloCommand(SettingsCommand):
    """--help lists what a silo's operator sets: its data, the model, and the way to the aggregator.
    Every other setting is accepted (one config file serves every rank) and in --help-all."""

    shown = frozenset(
        {
            "model",
            "dataset",
            "text_column",
            "label_column",
            "partition",
            "device",
            "aggregator",
            "transport",
            "tls_cert",
            "tls_key",
            "tls_ca",
            "tls_server_name",
            "token_file",
        }
    )


def resolve_rank(rank: int | None) -> int:
    """``--rank``, else a Kubernetes Indexed Job's completion index + 1."""
    if rank is not None:
        return rank
    index = os.environ.get("JOB_COMPLETION_INDEX")
    if index is None:
        raise ConfigError("silo needs --rank R (1..K), or JOB_COMPLETION_INDEX from an Indexed Job")
    if not index.isdigit():
        raise ConfigError(f"JOB_COMPLETION_INDEX must be a number, got {index!r}")
    return int(index) + 1


def command(
    ctx: typer.Context,
    rank: Annotated[
        int | None,
        whole_number(
            "--rank",
            envvar="FEDSILO_RANK",
            help="This silo's rank, 1..K. Default: JOB_COMPLETION_INDEX + 1 (Kubernetes Indexed Job).",
        ),
    ] = None,
) -> None:
    """Run one silo: train on local data each round and send only the weighted model update.

    With --partition none the silo trains on all of its own --dataset; its rows never leave this process.
    """
    from fedsilo import silo

    settings = settings_of(ctx)
    silo.serve(settings, resolve_rank(rank), read_token(settings.federation.token_file))
