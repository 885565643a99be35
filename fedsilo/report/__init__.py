"""`fedsilo report`: summarise a sweep stored in MLflow as tables and the paper's three figures.

One module per job, in the order the data flows: `runs` reads the finished federation runs from
MLflow as `Curve`s; `summary` is the pure arithmetic (`Curve` -> `summarise` -> `SummaryRow`);
`tables` and `figures` render the rows as summary.csv/summary.md and PNGs; `write` runs them in
turn for `write_report`. MLflow's conventions (tags, paging) belong to fedsilo.tracking.
"""

from __future__ import annotations

from fedsilo.report.summary import (
    BASELINE_AT_CHANCE,
    MAJORITY_LABEL,
    NO_BASELINE,
    NOT_REACHED,
    RANDOM_LABEL,
    Curve,
    ReportError,
    SummaryRow,
    latest_per_seed,
    mean_curve,
    rounds_to_target,
    summarise,
)
from fedsilo.report.tables import csv_text, markdown_text
from fedsilo.report.write import ReportResult, write_report

__all__ = [
    "BASELINE_AT_CHANCE",
    "MAJORITY_LABEL",
    "NOT_REACHED",
    "NO_BASELINE",
    "RANDOM_LABEL",
    "Curve",
    "ReportError",
    "ReportResult",
    "SummaryRow",
    "csv_text",
    "latest_per_seed",
    "markdown_text",
    "mean_curve",
    "rounds_to_target",
    "summarise",
    "write_report",
]
