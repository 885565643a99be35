"""`fedsilo report`: summarise a sweep stored in MLflow as tables and the paper's three figures.

The arithmetic is pure and works on in-memory curves (`Curve` -> `summarise` -> `SummaryRow`);
only `load_curves` and `write_report` touch MLflow, and only the `plot_*` functions touch
matplotlib, through `matplotlib.figure.Figure` (Agg canvas, no pyplot, no global backend).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsilo.errors import FedsiloError
from fedsilo.tracking import MAJORITY_PARAM, PARENT_TAG, redact_uri, search_all_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

# The paper's target: 90% of the non-federated (K = 1) baseline accuracy at the budget.
TARGET_FRACTION = 0.9
# Accuracies are ratios of counts; 0.9 * 0.8 is 0.7200000000000001, which must count as reaching
# a logged 0.72.
_TOLERANCE = 1e-9

METRIC = "test_accuracy"
ARTIFACT_DIR = "report"
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
FIG_ACCURACY_VS_CLIENTS = "accuracy_vs_clients.png"
FIG_ROUNDS_TO_TARGET = "rounds_to_target.png"
FIG_ACCURACY_VS_ROUNDS = "accuracy_vs_rounds.png"

NOT_REACHED = "not reached"
NO_BASELINE = "no baseline"

CSV_COLUMNS = (
    "model",
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


class ReportError(FedsiloError):
    """MLflow holds nothing this report can summarise, or the runs contradict each other."""


@dataclass(frozen=True)
class Curve:
    """Test accuracy per round of one federation run, with the run's settings.

    `accuracy` maps round (MLflow step, from 1) to test accuracy. `budget` is the round at
    which "accuracy at the budget" is read; `threshold` the last round that counts for
    rounds-to-target (the paper's second threshold).
    """

    model: str
    dataset: str
    silos: int
    seed: int
    num_labels: int
    budget: int
    threshold: int
    accuracy: Mapping[int, float]
    run_id: str = ""
    start_time: int = 0
    majority_accuracy: float | None = None  # always answering the test set's most frequent label


@dataclass(frozen=True)
class SummaryRow:
    """One (model, dataset, K) over its seeds. `None` means "not available" (see `rounds_text`)."""

    model: str
    dataset: str
    silos: int
    seeds: tuple[int, ...]
    num_labels: int
    budget: int
    threshold: int
    accuracy_at_budget: float | None
    accuracy_at_budget_std: float | None  # sample std over seeds; None with one seed
    best_accuracy: float | None
    best_round: int | None
    target_accuracy: float | None  # None: no K = 1 run (or it has no accuracy at its budget)
    rounds_to_target: int | None  # None: see `rounds_text`
    majority_accuracy: float | None = None  # None: not logged (silos evaluated), or the dataset's runs disagree
    mean_curve: Mapping[int, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def random_accuracy(self) -> float:
        """A uniform random guess."""
        return 1.0 / self.num_labels

    @property
    def chance(self) -> tuple[float, str]:
        """The floor to beat and its name: the majority class where known (on an imbalanced test
        set it is above a uniform guess), else a uniform guess."""
        if self.majority_accuracy is not None:
            return self.majority_accuracy, MAJORITY_LABEL
        return self.random_accuracy, RANDOM_LABEL

    @property
    def rounds_text(self) -> str:
        """The round number, "not reached" (within the threshold) or "no baseline"."""
        if self.target_accuracy is None:
            return NO_BASELINE
        if self.rounds_to_target is None:
            return NOT_REACHED
        return str(self.rounds_to_target)


@dataclass(frozen=True)
class ReportResult:
    """What `write_report` wrote and, if it found one, the parent run it logged to."""

    out_dir: Path
    summary_md: Path
    summary_csv: Path
    figures: tuple[Path, ...]
    rows: tuple[SummaryRow, ...]
    runs: int  # federation runs summarised
    parent_run_id: str | None
    superseded_run_ids: tuple[str, ...] = ()  # older runs of a repeated seed, left out

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.summary_md, self.summary_csv, *self.figures)


# ---------------------------------------------------------------------------------------------
# Pure arithmetic
# ---------------------------------------------------------------------------------------------


def mean_curve(curves: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """Per-round mean over seeds, on the rounds every seed logged (so no round mixes seeds)."""
    if not curves:
        return {}
    rounds = set(curves[0]).intersection(*curves[1:])
    return {r: math.fsum(c[r] for c in curves) / len(curves) for r in sorted(rounds)}


def rounds_to_target(curve: Mapping[int, float], target: float, threshold: int) -> int | None:
    """First round at which `curve` reaches `target`, or None if it does not by `threshold`."""
    for r in sorted(curve):
        if r > threshold:
            return None
        if curve[r] >= target - _TOLERANCE:
            return r
    return None


def accuracy_at(curve: Mapping[int, float], round_: int) -> float | None:
    """Accuracy logged at exactly `round_`; None if that round was not evaluated.

    Not the nearest earlier round: comparing models "at the budget" with a value from another
    round would be comparing unlike things without saying so.
    """
    return curve.get(round_)


def best_point(curve: Mapping[int, float]) -> tuple[int, float] | None:
    """(round, accuracy) of the highest accuracy; the earliest such round on ties."""
    if not curve:
        return None
    best = max(curve.values())
    return min(r for r, a in curve.items() if a == best), best


def latest_per_seed(curves: Iterable[Curve]) -> tuple[list[Curve], list[Curve]]:
    """Keep the most recently started run of each (model, dataset, K, seed).

    A seed run twice (e.g. a sweep repeated in the same experiment) is one sample, not two;
    counting both would shrink the std. Returns (kept, superseded).
    """
    by_key: dict[tuple[str, str, int, int], list[Curve]] = defaultdict(list)
    for c in curves:
        by_key[(c.model, c.dataset, c.silos, c.seed)].append(c)
    kept: list[Curve] = []
    superseded: list[Curve] = []
    for group in by_key.values():
        group.sort(key=lambda c: (c.start_time, c.run_id))
        kept.append(group[-1])
        superseded.extend(group[:-1])
    return kept, superseded


def _one_value(values: Iterable[int], what: str, where: str) -> int:
    distinct = sorted(set(values))
    if len(distinct) != 1:
        raise ReportError(f"runs for {where} disagree on {what}: {distinct}")
    return distinct[0]


def _summarise_group(key: tuple[str, str, int], curves: Sequence[Curve]) -> SummaryRow:
    """Everything about one (model, dataset, K) except the baseline-dependent fields."""
    model, dataset, silos = key
    where = f"model {model!r}, dataset {dataset!r}, K={silos}"
    budget = _one_value((c.budget for c in curves), "budget", where)
    threshold = _one_value((c.threshold for c in curves), "threshold", where)
    num_labels = _one_value((c.num_labels for c in curves), "num_labels", where)

    at_budget = [accuracy_at(c.accuracy, budget) for c in curves]
    present = [a for a in at_budget if a is not None]
    # A mean over only the seeds that reached the budget would be a different population.
    complete = len(present) == len(at_budget)
    acc = statistics.fmean(present) if complete else None
    std = statistics.stdev(present) if complete and len(present) > 1 else None

    curve = mean_curve([c.accuracy for c in curves])
    best = best_point(curve)
    return SummaryRow(
        model=model,
        dataset=dataset,
        silos=silos,
        seeds=tuple(sorted(c.seed for c in curves)),
        num_labels=num_labels,
        budget=budget,
        threshold=threshold,
        accuracy_at_budget=acc,
        accuracy_at_budget_std=std,
        best_accuracy=None if best is None else best[1],
        best_round=None if best is None else best[0],
        target_accuracy=None,
        rounds_to_target=None,
        mean_curve=curve,
    )


def summarise(curves: Iterable[Curve]) -> list[SummaryRow]:
    """One row per (model, dataset, K), sorted by dataset, model, K.

    Seeds are averaged: accuracy at the budget is the mean (and sample std) of each seed's value;
    best accuracy and rounds-to-target are read off the seed-mean curve. The target is
    `TARGET_FRACTION` x the K = 1 row's accuracy at its budget, for the same model and dataset.
    Raises ReportError if the seeds of one group disagree on budget, threshold or num_labels,
    or the runs of one dataset disagree on num_labels.
    """
    groups: dict[tuple[str, str, int], list[Curve]] = defaultdict(list)
    for c in curves:
        groups[(c.model, c.dataset, c.silos)].append(c)
    order = sorted(groups, key=lambda k: (k[1], k[0], k[2]))  # dataset, model, K
    rows = [_summarise_group(k, groups[k]) for k in order]

    labels_by_dataset: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        labels_by_dataset[row.dataset].add(row.num_labels)
    for dataset, labels in labels_by_dataset.items():
        _one_value(labels, "num_labels", f"dataset {dataset!r}")
    # One floor per dataset (its test set's), where every run of it logged the same one.
    majorities: dict[str, set[float | None]] = defaultdict(set)
    for group in groups.values():
        for c in group:
            majorities[c.dataset].add(c.majority_accuracy)
    rows = [replace(r, majority_accuracy=next(iter(majorities[r.dataset]))) if len(majorities[r.dataset]) == 1 else r
            for r in rows]

    baselines = {
        (r.model, r.dataset): r.accuracy_at_budget
        for r in rows
        if r.silos == 1 and r.accuracy_at_budget is not None
    }
    return [_with_target(row, baselines.get((row.model, row.dataset))) for row in rows]


def _with_target(row: SummaryRow, baseline: float | None) -> SummaryRow:
    if baseline is None:
        return row
    target = TARGET_FRACTION * baseline
    return replace(
        row,
        target_accuracy=target,
        rounds_to_target=rounds_to_target(row.mean_curve, target, row.threshold),
    )


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


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
        return NO_BASELINE
    return f"{r.rounds_text} (target {r.target_accuracy:.4f}, ≤ {r.threshold})"


def _floor_sentence(r: SummaryRow) -> str:
    uniform = f"a uniform random guess scores {r.random_accuracy:.4f}"
    if r.majority_accuracy is None:
        return f"{r.num_labels} labels; {uniform}."
    return (f"{r.num_labels} labels; always answering the test set's most frequent label (the majority "
            f"class) scores {r.majority_accuracy:.4f}, {uniform}.")


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
        'within the threshold; otherwise "not reached", or "no baseline" without a K = 1 run.',
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
            lines.append(
                f"| {r.model} | {r.silos} | {len(r.seeds)} | {_md_accuracy(r)} | {best} "
                f"| {_md_rounds(r)} |"
            )
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures (like the paper's Fig. 1-3)
# ---------------------------------------------------------------------------------------------


RANDOM_LABEL = "random classifier"
MAJORITY_LABEL = "majority class"
BUDGET_LABEL = "budget"
THRESHOLD_LABEL = "threshold"
NOT_REACHED_LABEL = "not reached by threshold"
_REFERENCE_LABELS = frozenset({RANDOM_LABEL, MAJORITY_LABEL, BUDGET_LABEL, THRESHOLD_LABEL, NOT_REACHED_LABEL})


def _colours(keys: Sequence[str]) -> dict[str, Any]:
    """A stable colour per model, the same in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def _clients_axis(ax: Axes, ks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.minorticks_off()
    lo, hi = min(ks), max(ks)
    ax.set_xlim(lo / 2**0.4, hi * 2**0.4)
    ax.set_xlabel("Number of clients (K)")
    ax.grid(True, alpha=0.3)


def _budget_phrase(rows: Sequence[SummaryRow]) -> str:
    budgets = sorted({r.budget for r in rows})
    return f"round {budgets[0]}" if len(budgets) == 1 else "each run's budget"


def _width(per_panel: float, panels: Sequence[str]) -> float:
    """Figure width in inches: wide enough for the legend row even with one panel."""
    return max(per_panel * len(panels), 6.5)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _datasets_models(rows: Sequence[SummaryRow]) -> tuple[list[str], list[str]]:
    return sorted({r.dataset for r in rows}), sorted({r.model for r in rows})


def plot_accuracy_vs_clients(rows: Sequence[SummaryRow], path: Path) -> Path:
    """Fig. 1: accuracy at the budget vs K (log2), a panel per dataset, a line per model."""
    from matplotlib.figure import Figure

    datasets, models = _datasets_models(rows)
    colours = _colours(models)
    ks = sorted({r.silos for r in rows})
    fig = Figure(figsize=(_width(4.2, datasets), 3.6), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets, strict=True):
        drows = [r for r in rows if r.dataset == dataset]
        for model in models:
            pts = [r for r in drows if r.model == model and r.accuracy_at_budget is not None]
            if not pts:
                continue
            ax.errorbar(
                [r.silos for r in pts],
                [r.accuracy_at_budget for r in pts],
                yerr=[r.accuracy_at_budget_std or 0.0 for r in pts],
                marker="o",
                capsize=3,
                color=colours[model],
                label=model,
            )
        floor, name = drows[0].chance
        ax.axhline(floor, ls="--", color="0.4", lw=1, label=name)
        _clients_axis(ax, ks)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{dataset}\naccuracy at {_budget_phrase(drows)}", fontsize=11)
        ax.set_ylabel("Test accuracy")
    _figure_legend(fig, axes)
    fig.suptitle("Test accuracy at a fixed budget of rounds (higher is better)")
    return _save(fig, path)


def _figure_legend(fig: Any, axes: Sequence[Axes], extra: Sequence[Any] = ()) -> None:
    """One legend for the whole figure, below the panels: panels stay uncluttered.

    Data series first, then the reference lines (dashed/dotted), then `extra` proxy handles.
    """
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    for h in extra:
        handles.setdefault(h.get_label(), h)
    is_reference = {label: label in _REFERENCE_LABELS for label in handles}
    labels = sorted(handles, key=lambda label: is_reference[label])  # stable: keeps plot order
    if labels:
        fig.legend(
            [handles[label] for label in labels],
            labels,
            loc="outside lower center",
            ncols=min(len(labels), 5),
            frameon=False,
        )


def plot_rounds_to_target(rows: Sequence[SummaryRow], path: Path) -> Path:
    """Fig. 2: rounds to reach 90% of K = 1 vs K, a panel per dataset, a line per model.

    A "not reached" point is drawn as an x on the dashed threshold line in the model's colour
    (the paper leaves a gap); "no baseline" groups are left out. A random-classifier line has no
    meaning on a rounds axis (a random classifier never reaches the target), so the dashed line
    here is the threshold.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    datasets, models = _datasets_models(rows)
    colours = _colours(models)
    ks = sorted({r.silos for r in rows})
    fig = Figure(figsize=(_width(4.2, datasets), 3.6), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets, strict=True):
        drows = [r for r in rows if r.dataset == dataset and r.target_accuracy is not None]
        thresholds = sorted({r.threshold for r in drows})
        for i, model in enumerate(models):
            mrows = [r for r in drows if r.model == model]
            reached = [r for r in mrows if r.rounds_to_target is not None]
            missed = [r for r in mrows if r.rounds_to_target is None]
            if reached:
                ax.plot(
                    [r.silos for r in reached],
                    [r.rounds_to_target for r in reached],
                    marker="o",
                    color=colours[model],
                    label=model,
                )
            if missed:
                # Nudge models sideways so their crosses do not hide each other.
                nudge = 2 ** (0.12 * (i - (len(models) - 1) / 2))
                ax.plot(
                    [r.silos * nudge for r in missed],
                    [r.threshold for r in missed],
                    ls="none",
                    marker="x",
                    ms=9,
                    mew=2,
                    color=colours[model],
                )
        for t in thresholds:
            ax.axhline(t, ls="--", color="0.4", lw=1, label=THRESHOLD_LABEL)
        if not drows:
            ax.text(0.5, 0.5, NO_BASELINE, transform=ax.transAxes, ha="center", va="center")
        _clients_axis(ax, ks)
        ax.set_ylim(bottom=0, top=max(thresholds, default=1) * 1.08)
        ax.set_title(f"{dataset}", fontsize=11)
        ax.set_ylabel(f"Rounds to {TARGET_FRACTION:.0%} of K = 1 accuracy")
    proxies = [Line2D([], [], marker="o", color=colours[m], label=m) for m in models] + [
        Line2D([], [], ls="none", marker="x", ms=9, mew=2, color="0.3", label=NOT_REACHED_LABEL)
    ]
    _figure_legend(fig, axes, extra=proxies)
    fig.suptitle(f"Rounds to reach {TARGET_FRACTION:.0%} of the K = 1 baseline (lower is better)")
    return _save(fig, path)


def plot_accuracy_vs_rounds(rows: Sequence[SummaryRow], path: Path) -> Path:
    """Fig. 3: seed-mean accuracy over rounds; rows = model, columns = dataset, a line per K."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    datasets, models = _datasets_models(rows)
    ks = sorted({r.silos for r in rows})
    cmap = colormaps["viridis"]
    # Dark for K = 1 through light for the largest K; the top of viridis is too pale on white.
    k_colour = {k: cmap(0.85 * i / max(len(ks) - 1, 1)) for i, k in enumerate(ks)}
    fig = Figure(figsize=(_width(3.8, datasets), 2.9 * len(models) + 0.6), layout="constrained")
    grid = fig.subplots(len(models), len(datasets), squeeze=False, sharex="col", sharey=True)
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = grid[i][j]
            cell = [r for r in rows if r.model == model and r.dataset == dataset]
            for r in cell:
                xs = sorted(r.mean_curve)
                ys = [r.mean_curve[x] for x in xs]
                ax.plot(xs, ys, color=k_colour[r.silos], lw=1.5, label=f"K = {r.silos}")
            floor, name = [r.chance for r in rows if r.dataset == dataset][0]
            ax.axhline(floor, ls="--", color="0.4", lw=1, label=name)
            budgets = sorted({r.budget for r in cell})
            for b in budgets:
                ax.axvline(b, ls=":", color="0.6", lw=1, label=BUDGET_LABEL)
            if not cell:
                ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center")
            ax.set_ylim(0, 1.02)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{model} · {dataset}", fontsize=10)
            if i == len(models) - 1:
                ax.set_xlabel("Communication round")
            if j == 0:
                ax.set_ylabel("Test accuracy")
    _figure_legend(fig, [ax for row in grid for ax in row])
    fig.suptitle("Test accuracy over communication rounds (mean over seeds)")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


def _check_sqlite_exists(uri: str) -> None:
    """Reading a sqlite URI that names no file would create an empty database there."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists():
        raise ReportError(f"no MLflow database at {uri}")


def _int_param(run: Run, name: str, default: int | None = None) -> int:
    raw = run.data.params.get(name)
    if raw is None or raw.strip() in ("", "None", "null"):
        if default is None:
            raise ReportError(f"run {run.info.run_id} has no param '{name}'")
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise ReportError(f"run {run.info.run_id}: param '{name}' = {raw!r} is not an integer")
    return int(value)


def _float_param(run: Run, name: str) -> float | None:
    """An optional number (runs logged before it existed have none)."""
    raw = run.data.params.get(name)
    try:
        return None if raw is None else float(raw)
    except ValueError:
        raise ReportError(f"run {run.info.run_id}: param '{name}' = {raw!r} is not a number") from None


def _str_param(run: Run, name: str) -> str:
    raw = run.data.params.get(name)
    if not raw:
        raise ReportError(f"run {run.info.run_id} has no param '{name}'")
    return raw


def _is_parent(run: Run) -> bool:
    return run.data.tags.get(PARENT_TAG) == "parent"


def _curve_from_run(client: MlflowClient, run: Run) -> Curve:
    rounds = _int_param(run, "rounds")
    history = sorted(client.get_metric_history(run.info.run_id, METRIC), key=lambda m: m.timestamp)
    # A round logged twice (a resumed federation re-evaluates it): the later value stands.
    accuracy = {int(m.step): float(m.value) for m in history}
    return Curve(
        model=_str_param(run, "model"),
        dataset=_str_param(run, "dataset"),
        silos=_int_param(run, "silos"),
        seed=_int_param(run, "seed"),
        num_labels=_int_param(run, "num_labels"),
        budget=_int_param(run, "budget", default=rounds),
        threshold=_int_param(run, "threshold", default=rounds),
        accuracy=accuracy,
        run_id=run.info.run_id,
        start_time=int(run.info.start_time or 0),
        majority_accuracy=_float_param(run, MAJORITY_PARAM),
    )


def load_curves(client: MlflowClient, experiment: str, uri: str) -> tuple[list[Curve], Run | None]:
    """The finished federation runs of `experiment` as curves, and its most recent parent run.

    A federation run is any run that is not a sweep parent and has a `silos` param; the parent
    may still be running (a sweep reports before it ends).
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"experiment '{experiment}' not found at {redact_uri(uri)}")
    runs = search_all_runs(client, exp.experiment_id)
    parents = sorted((r for r in runs if _is_parent(r)), key=lambda r: r.info.start_time or 0)
    members = [
        r
        for r in runs
        if not _is_parent(r) and r.info.status == "FINISHED" and "silos" in r.data.params
    ]
    if not members:
        raise ReportError(f"experiment '{experiment}' has no finished federation runs to report on")
    return [_curve_from_run(client, r) for r in members], (parents[-1] if parents else None)


def write_report(experiment: str, tracking_uri: str, out_dir: Path) -> ReportResult:
    """Summarise an MLflow experiment's federation runs as tables and the paper's figures.

    Reads every finished federation run of EXPERIMENT and writes to OUT_DIR: summary.md and
    summary.csv (per model, dataset and number of clients K: test accuracy at the budget round,
    best accuracy, and rounds until the accuracy reaches 90% of the same model and dataset's
    K = 1 run, else "not reached", or "no baseline" without a K = 1 run; several seeds are
    averaged) and three figures like the paper's: accuracy_vs_clients.png,
    rounds_to_target.png and accuracy_vs_rounds.png. If the experiment has a sweep parent run
    (the most recent one), the files are also logged to it as artifacts under report/.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _check_sqlite_exists(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        curves, parent = load_curves(client, experiment, tracking_uri)
    except MlflowException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReportError(f"cannot read MLflow at {redact_uri(tracking_uri)}: {first}") from e
    kept, superseded = latest_per_seed(curves)
    rows = summarise(kept)

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = (
        plot_accuracy_vs_clients(rows, out_dir / FIG_ACCURACY_VS_CLIENTS),
        plot_rounds_to_target(rows, out_dir / FIG_ROUNDS_TO_TARGET),
        plot_accuracy_vs_rounds(rows, out_dir / FIG_ACCURACY_VS_ROUNDS),
    )
    csv_path = out_dir / SUMMARY_CSV
    csv_path.write_text(csv_text(rows), encoding="utf-8")
    md_path = out_dir / SUMMARY_MD
    md_path.write_text(markdown_text(experiment, rows, [p.name for p in figures]), encoding="utf-8")

    result = ReportResult(
        out_dir=out_dir,
        summary_md=md_path,
        summary_csv=csv_path,
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
