"""summary.csv, summary.md, paired.csv and equal_steps.csv: the report's rows and comparisons as text."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from fedsilo.report.compare import AtSteps, Paired
from fedsilo.report.stats import Interval
from fedsilo.report.summary import TARGET_FRACTION, SummaryRow

CSV_COLUMNS = (
    "model",
    "model_path",
    "dataset",
    "silos",
    "series",
    "seeds",
    "budget",
    "accuracy_at_budget",
    "accuracy_at_budget_std",
    "accuracy_at_budget_ci95",
    "test_examples",
    "binomial_se",
    "best_accuracy",
    "best_round",
    "threshold",
    "target_accuracy",
    "rounds_to_target",
    "rounds_to_target_per_seed",
    "random_accuracy",
    "majority_accuracy",
)
PAIRED_COLUMNS = ("dataset", "first", "second", "round", "difference", "ci95", "seeds")
STEPS_COLUMNS = (
    "dataset",
    "model",
    "series",
    "steps",
    "round",
    "accuracy",
    "accuracy_ci95",
    "baseline_round",
    "baseline_accuracy",
    "baseline_ci95",
    "difference",
    "difference_ci95",
    "seeds",
)


def _num(x: float | None, digits: int = 6) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _csv(columns: Sequence[str], lines: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(lines)
    return buf.getvalue()


def csv_text(rows: Iterable[SummaryRow]) -> str:
    """summary.csv: one line per row of `summarise`; empty cells where a value is unavailable."""
    return _csv(
        CSV_COLUMNS,
        (
            [
                r.name,
                r.model,
                r.dataset,
                r.silos,
                r.label or f"K = {r.silos}",
                " ".join(str(s) for s in r.seeds),
                r.budget,
                _num(r.accuracy_at_budget),
                _num(r.accuracy_at_budget_std),
                _num(r.accuracy_at_budget_ci),
                "" if r.test_examples is None else r.test_examples,
                _num(r.binomial_se),
                _num(r.best_accuracy),
                "" if r.best_round is None else r.best_round,
                r.threshold,
                _num(r.target_accuracy),
                r.rounds_text,
                " ".join("-" if x is None else str(x) for x in r.seed_rounds),
                _num(r.random_accuracy),
                _num(r.majority_accuracy),
            ]
            for r in rows
        ),
    )


def _ci(x: Interval) -> str:
    return "" if x.half_width is None else _num(x.half_width)


def _seeds(seeds: Iterable[int]) -> str:
    return " ".join(str(s) for s in seeds)


def paired_csv(pairs: Iterable[Paired]) -> str:
    """paired.csv: one line per paired difference at the budget."""
    return _csv(
        PAIRED_COLUMNS,
        (
            [p.dataset, p.first, p.second, p.round_, _num(p.difference.mean), _ci(p.difference), _seeds(p.seeds)]
            for p in pairs
        ),
    )


def steps_csv(points: Iterable[AtSteps]) -> str:
    """equal_steps.csv: one line per series and step count shared with K = 1."""
    return _csv(
        STEPS_COLUMNS,
        (
            [
                a.dataset,
                a.model,
                a.series,
                a.steps,
                a.round_,
                _num(a.accuracy.mean),
                _ci(a.accuracy),
                a.baseline_round,
                _num(a.baseline.mean),
                _ci(a.baseline),
                _num(a.difference.mean),
                _ci(a.difference),
                _seeds(a.seeds),
            ]
            for a in points
        ),
    )


def _md_accuracy(r: SummaryRow) -> str:
    if r.accuracy_at_budget is None:
        return f"n/a (round {r.budget} not logged)"
    ci = "" if r.accuracy_at_budget_ci is None else f" ± {r.accuracy_at_budget_ci:.4f}"
    return f"{r.accuracy_at_budget:.4f}{ci} (round {r.budget})"


def _md_se(r: SummaryRow) -> str:
    se = r.binomial_se
    return "n/a" if se is None else f"{se:.4f} (n = {r.test_examples})"


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


def markdown_text(
    experiment: str,
    rows: Sequence[SummaryRow],
    figures: Sequence[str],
    pairs: Sequence[Paired] = (),
    points: Sequence[AtSteps] = (),
) -> str:
    """summary.md: a table per dataset, the paired differences, the comparisons at equal steps,
    then the figures (linked by file name)."""
    runs = sum(len(r.seeds) for r in rows)
    lines = [
        f"# fedsilo report: experiment `{experiment}`",
        "",
        f"{runs} finished federation runs in {len(rows)} (model, dataset, series) groups. A series is "
        "K clients, or K with an ablation, or a control. Accuracy is test accuracy. Accuracy at the "
        "budget is the mean over seeds ± the half-width of its 95% t-interval; the test-set SE is "
        "the binomial standard error sqrt(p(1 - p)/n) that n test rows alone put on one accuracy. "
        "Best accuracy and rounds to target (mean curve) are read off the seed-mean curve. Rounds to "
        f"target: first round at which the curve reaches {TARGET_FRACTION:.0%} of the same model and "
        'dataset\'s K = 1 accuracy at its budget, within the threshold; otherwise "not reached", "no '
        'baseline" without a K = 1 run, or "baseline at chance" when the K = 1 run did not beat the '
        "majority class (a uniform guess where that is unknown). Per seed: how many seeds reached the "
        "target, and their median round (a seed that did not reach it counts as later than any that did).",
    ]
    for dataset in sorted({r.dataset for r in rows}):
        drows = [r for r in rows if r.dataset == dataset]
        lines += [
            "",
            f"## {dataset}",
            "",
            _floor_sentence(drows[0]),
            "",
            "| Model | Series | Seeds | Accuracy at budget | Test-set SE | Best accuracy (round) "
            f"| Rounds to {TARGET_FRACTION:.0%} of K = 1 (mean curve) | Per seed |",
            "|---|---|---:|---|---|---|---|---|",
        ]
        for r in drows:
            best = "n/a" if r.best_accuracy is None else f"{r.best_accuracy:.4f} ({r.best_round})"
            lines.append(
                f"| {r.name} | {r.label or f'K = {r.silos}'} | {_seeds(r.seeds)} | {_md_accuracy(r)} "
                f"| {_md_se(r)} | {best} | {_md_rounds(r)} | {r.reached_text} |"
            )
    if pairs:
        lines += [
            "",
            "## Paired differences at the budget",
            "",
            "First minus second, seed by seed on the seeds both have; mean ± 95% t-interval.",
            "",
            "| Dataset | First | Second | Round | Difference | Seeds |",
            "|---|---|---|---:|---|---|",
        ]
        lines += [
            f"| {p.dataset} | {p.first} | {p.second} | {p.round_} | {p.difference.text()} | {_seeds(p.seeds)} |"
            for p in pairs
        ]
    if points:
        lines += [
            "",
            "## At equal sequential steps",
            "",
            "Each series at a round where its runs have taken as many sequential local SGD steps as K = 1's "
            "runs at the end of one of theirs (clients train side by side, so a round adds the slowest "
            "client's steps). Difference: the series minus K = 1, seed by seed; mean ± 95% t-interval.",
            "",
            "| Dataset | Model | Series | Steps | Round | Accuracy | K = 1 (round) | Difference | Seeds |",
            "|---|---|---|---:|---:|---|---|---|---|",
        ]
        lines += [
            f"| {a.dataset} | {a.model} | {a.series} | {a.steps} | {a.round_} | {a.accuracy.text()} "
            f"| {a.baseline.text()} ({a.baseline_round}) | {a.difference.text()} | {_seeds(a.seeds)} |"
            for a in points
        ]
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
