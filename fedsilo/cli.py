"""The ``fedsilo`` command: registers commands only; each lives in its own module."""

from __future__ import annotations

import typer

from fedsilo.commands import aggregator, report, run, silo, simulate, sweep

app = typer.Typer(
    name="fedsilo",
    help="Cross-silo federated fine-tuning of transformer text classifiers (FedAvg over "
    "torch.distributed, tracked in MLflow).\n\nEvery option can also be set with a FEDSILO_* "
    "environment variable or in a YAML file given with --config.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # tracebacks must never print a token
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
)
app.command("aggregator")(aggregator.command)
app.command("silo")(silo.command)
app.command("run")(run.command)
app.command("simulate")(simulate.command)
app.command("sweep")(sweep.command)
app.command("report")(report.command)
