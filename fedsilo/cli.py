"""The ``fedsilo`` command: registers commands only; each lives in its own module."""

from __future__ import annotations

import os

# torch's C++ layer logs every failed store connect and broken collective with a native stack
# trace (~30 'frame #' lines) before the exception reaches us; fedsilo turns those exceptions
# into one line. c10 reads the level once, when torch loads, so this must precede any import of
# torch. Set TORCH_CPP_LOG_LEVEL=INFO to see torch's own logs when debugging.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from fedsilo import __version__  # noqa: E402
from fedsilo.commands import aggregator, certs, report, run, silo, simulate, sweep  # noqa: E402
from fedsilo.options import FedsiloGroup, SettingsCommand  # noqa: E402

app = typer.Typer(
    cls=FedsiloGroup,  # user errors, Click's usage errors among them, are one line
    name="fedsilo",
    help="Cross-silo federated fine-tuning of transformer text classifiers (FedAvg over "
    "torch.distributed, tracked in MLflow).\n\nEvery option can also be set with a FEDSILO_* "
    "environment variable or in a YAML file given with --config.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # tracebacks must never print a token
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"fedsilo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print fedsilo's version and exit."),
    ] = False,
) -> None:
    # The group's own options only (no docstring: the help above stays the group's help).
    del version


app.command("aggregator", cls=SettingsCommand)(aggregator.command)
app.command("silo", cls=silo.SiloCommand)(silo.command)
app.command("run", cls=SettingsCommand)(run.command)
app.command("simulate", cls=SettingsCommand)(simulate.command)
app.command("sweep")(sweep.command)
app.command("report")(report.command)
app.add_typer(certs.app, name="certs")
