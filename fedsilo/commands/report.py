"""``fedsilo report``: tables and the paper's figures from an MLflow experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsilo.report import write_report


def command(
    experiment: Annotated[
        str,
        typer.Option(
            "--experiment", envvar="FEDSILO_EXPERIMENT", help="MLflow experiment holding the federation runs."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", envvar="FEDSILO_REPORT_OUT", help="Directory for summary.md, summary.csv and the PNG figures."
        ),
    ] = Path("report"),
    tracking_uri: Annotated[
        str, typer.Option("--tracking-uri", envvar="FEDSILO_TRACKING_URI", help="MLflow tracking URI.")
    ] = "sqlite:///mlflow.db",
) -> None:
    result = write_report(experiment, tracking_uri, out)
    for path in result.files:
        typer.echo(str(path))


command.__doc__ = write_report.__doc__
