"""summary.csv and summary.md: the rows of `summarise` as text."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from fedsilo.report.summary import TARGET_FRACTION, SummaryRow

CSV_COLUMNS = (
    "model",
    "model_path",
    "dataset",
    "silos",
    "seeds",
    "budget",
    "accuracy_at_budget",
    "accuracy_at_budget_std",
    "best_accuracy",
    "best_round",
    "threshold",
    "target_accuracy",
    "rounds_to_target",
    "random_accuracy",
    "majority_accuracy",
)


def _num(x: float | None, digits: int = 6) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def csv_text(rows: Iterable[SummaryRow]) -> str:
    """summary.csv: one line per row of `summarise`; empty cells where a value is unavailable."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(
            [
                r.name,
                r.model,
                r.dataset,
                r.silos,
                " ".join(str(s) for s in r.seeds),
                r.budget,
                _num(r.accuracy_at_budget),
                _num(r.accuracy_at_budget_std),
                _num(r.best_accuracy),
                "" if r.best_round is None else r.best_round,
                r.threshold,
                _num(r.target_accuracy),
                r.rounds_text,
                _num(r.random_accuracy),
                _num(r.majority_accuracy),
            ]
        )
    return buf.getvalue()


def _md_accuracy(r: SummaryRow) -> str:
    if r.accuracy_at_budget is None:
        return f"n/a (round {r.budget} not logged)"
    std = "" if r.accuracy_at_budget_std is None else f" ± {r.accuracy_at_budget_std:.4f}"
    return f"{r.accuracy_at_budget:.4f}{std} (round {r.budget})"


def _md_rounds(r: SummaryRow) -> str:
    if r.target_accuracy is None:
        return r.rounds_text
    return f"{r.rounds_text} (target {r.target_accuracy:.4f}, ≤ {r.threshold})"


def _floor_sentence(r: SummaryRow) -> str:
    uniform = f"a uniform random guess scores {r.random_accuracy:.4f}"
    if r.majority_accuracy is None:
        return f"{r.num_labels} labels; {uniform}."
    return (
        f"{r.num_labels} labels; always answering the test set's most frequent label (the majority "
        f"class) scores {r.majority_accuracy:.4f}, {uniform}."
    )


def markdown_text(experiment: str, rows: Sequence[SummaryRow], figures: Sequence[str]) -> str:
    """summary.md: a table per dataset, then the figures (linked by file name)."""
    runs = sum(len(r.seeds) for r in rows)
    lines = [
        f"# fedsilo report: experiment `{experiment}`",
        "",
        f"{runs} finished federation runs in {len(rows)} (model, dataset, K) groups. "
        "Accuracy is test accuracy. With several seeds, accuracy at the budget is the mean ± "
        "sample std over seeds; best accuracy and rounds to target are read off the seed-mean "
        "curve. Rounds to target: first round at which the curve reaches "
        f"{TARGET_FRACTION:.0%} of the same model and dataset's K = 1 accuracy at its budget, "
        'within the threshold; otherwise "not reached", "no baseline" without a K = 1 run, or "baseline at '
        'chance" when the K = 1 run did not beat the majority class (a uniform guess where that is unknown). '
        "Seeds lists the seeds averaged, as summary.csv does.",
    ]
    for dataset in sorted({r.dataset for r in rows}):
        drows = [r for r in rows if r.dataset == dataset]
        lines += [
            "",
            f"## {dataset}",
            "",
            _floor_sentence(drows[0]),
            "",
            "| Model | K | Seeds | Accuracy at budget | Best accuracy (round) "
            f"| Rounds to {TARGET_FRACTION:.0%} of K = 1 |",
            "|---|---:|---:|---|---|---|",
        ]
        for r in drows:
            best = "n/a" if r.best_accuracy is None else f"{r.best_accuracy:.4f} ({r.best_round})"
            seeds = " ".join(str(s) for s in r.seeds)
            lines.append(f"| {r.name} | {r.silos} | {seeds} | {_md_accuracy(r)} | {best} | {_md_rounds(r)} |")
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
