"""`write_report`: read the runs, summarise them, write the tables and figures, log them to the sweep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsilo.errors import first_line
from fedsilo.report.compare import at_equal_steps, paired_differences, step_curves
from fedsilo.report.figures import (
    plot_accuracy_vs_clients,
    plot_accuracy_vs_rounds,
    plot_accuracy_vs_steps,
    plot_rounds_to_target,
)
from fedsilo.report.runs import check_sqlite_exists, load_curves
from fedsilo.report.summary import ReportError, SummaryRow, latest_per_seed, summarise
from fedsilo.report.tables import csv_text, markdown_text, paired_csv, steps_csv
from fedsilo.tracking import redact_uri

ARTIFACT_DIR = "report"
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
PAIRED_CSV = "paired.csv"
STEPS_CSV = "equal_steps.csv"
FIG_ACCURACY_VS_CLIENTS = "accuracy_vs_clients.png"
FIG_ROUNDS_TO_TARGET = "rounds_to_target.png"
FIG_ACCURACY_VS_ROUNDS = "accuracy_vs_rounds.png"
FIG_ACCURACY_VS_STEPS = "accuracy_vs_steps.png"


@dataclass(frozen=True)
class ReportResult:
    """What `write_report` wrote and, if it found one, the parent run it logged to."""

    out_dir: Path
    summary_md: Path
    summary_csv: Path
    tables: tuple[Path, ...]  # paired.csv and equal_steps.csv
    figures: tuple[Path, ...]
    rows: tuple[SummaryRow, ...]
    runs: int  # federation runs summarised
    parent_run_id: str | None
    superseded_run_ids: tuple[str, ...] = ()  # older runs of a repeated seed, left out

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.summary_md, self.summary_csv, *self.tables, *self.figures)


def write_report(experiment: str, tracking_uri: str, out_dir: Path) -> ReportResult:
    """Summarise an MLflow experiment's federation runs as tables and the paper's figures.

    Reads every finished federation run of EXPERIMENT and writes to OUT_DIR: summary.md and
    summary.csv (per model, dataset and number of clients K: test accuracy at the budget round,
    best accuracy, and rounds until the accuracy reaches 90% of the same model and dataset's
    K = 1 run, else "not reached", or "no baseline" without a K = 1 run; several seeds are
    averaged, with 95% t-intervals, the test set's binomial standard error and each seed's rounds
    to target), paired.csv (paired differences by seed at the budget), equal_steps.csv (every
    series against K = 1 at equal sequential steps), the paper's three figures
    (accuracy_vs_clients.png, rounds_to_target.png, accuracy_vs_rounds.png: main series only)
    and accuracy_vs_steps.png (every series). If the experiment has a sweep parent run
    (the most recent one), the files are also logged to it as artifacts under report/.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_sqlite_exists(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        curves, parent = load_curves(client, experiment, tracking_uri)
    except MlflowException as e:
        raise ReportError(redact_uri(f"cannot read MLflow at {tracking_uri}: {first_line(e)}")) from e
    kept, superseded = latest_per_seed(curves)
    rows = summarise(kept)

    pairs, points = paired_differences(kept), at_equal_steps(kept)

    out_dir.mkdir(parents=True, exist_ok=True)
    main = [r for r in rows if not r.variant]  # the paper's figures: K alone, where there is such a series
    figures = (
        *(
            (
                plot_accuracy_vs_clients(main, out_dir / FIG_ACCURACY_VS_CLIENTS),
                plot_rounds_to_target(main, out_dir / FIG_ROUNDS_TO_TARGET),
                plot_accuracy_vs_rounds(main, out_dir / FIG_ACCURACY_VS_ROUNDS),
            )
            if main
            else ()
        ),
        *(
            [plot_accuracy_vs_steps(step_curves(kept), rows, out_dir / FIG_ACCURACY_VS_STEPS)]
            if any(c.steps for c in kept)
            else []
        ),
    )
    csv_path = out_dir / SUMMARY_CSV
    csv_path.write_text(csv_text(rows), encoding="utf-8")
    tables = (out_dir / PAIRED_CSV, out_dir / STEPS_CSV)
    tables[0].write_text(paired_csv(pairs), encoding="utf-8")
    tables[1].write_text(steps_csv(points), encoding="utf-8")
    md_path = out_dir / SUMMARY_MD
    md_path.write_text(markdown_text(experiment, rows, [p.name for p in figures], pairs, points), encoding="utf-8")

    result = ReportResult(
        out_dir=out_dir,
        summary_md=md_path,
        summary_csv=csv_path,
        tables=tables,
        figures=figures,
        rows=tuple(rows),
        runs=len(kept),
        parent_run_id=None if parent is None else parent.info.run_id,
        superseded_run_ids=tuple(c.run_id for c in superseded),
    )
    if result.parent_run_id is not None:
        for path in result.files:
            client.log_artifact(result.parent_run_id, str(path), artifact_path=ARTIFACT_DIR)
    return result
