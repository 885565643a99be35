"""The paper's three figures (Fig. 1-3) from the rows of `summarise`.

Only this module touches matplotlib, through `matplotlib.figure.Figure` (Agg canvas, no pyplot,
no global backend), and only inside the functions: importing the report (as the CLI does for
every command) loads no matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsilo.report.stats import Interval
from fedsilo.report.summary import (
    BASELINE_AT_CHANCE,
    MAJORITY_LABEL,
    NO_BASELINE,
    RANDOM_LABEL,
    TARGET_FRACTION,
    SummaryRow,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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


def _names(rows: Sequence[SummaryRow]) -> dict[str, str]:
    """What legends and titles call each model: its short name (unique among the rows, `summarise`)."""
    return {r.model: r.name for r in rows}


def _whole_rounds(axis: Any) -> None:
    """Rounds are whole numbers: no tick at 1.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_accuracy_vs_clients(rows: Sequence[SummaryRow], path: Path) -> Path:
    """Fig. 1: accuracy at the budget vs K (log2), a panel per dataset, a line per model."""
    from matplotlib.figure import Figure

    datasets, models = _datasets_models(rows)
    colours, names = _colours(models), _names(rows)
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
                label=names[model],
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
    colours, names = _colours(models), _names(rows)
    ks = sorted({r.silos for r in rows})
    fig = Figure(figsize=(_width(4.2, datasets), 3.6), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets, strict=True):
        drows = [r for r in rows if r.dataset == dataset and r.target_accuracy is not None]
        at_chance = any(r.baseline_at_chance for r in rows if r.dataset == dataset)
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
                    label=names[model],
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
            why = BASELINE_AT_CHANCE if at_chance else NO_BASELINE
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center")
        _clients_axis(ax, ks)
        ax.set_ylim(bottom=0, top=max(thresholds, default=1) * 1.08)
        _whole_rounds(ax.yaxis)
        ax.set_title(f"{dataset}", fontsize=11)
        ax.set_ylabel(f"Rounds to {TARGET_FRACTION:.0%} of K = 1 accuracy")
    proxies = [Line2D([], [], marker="o", color=colours[m], label=names[m]) for m in models] + [
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
    names = _names(rows)
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
            _whole_rounds(ax.xaxis)
            _accuracy_panel(ax, f"{names[model]} · {dataset}", "Communication round" if i == len(models) - 1 else "", j)
    _figure_legend(fig, [ax for row in grid for ax in row])
    fig.suptitle("Test accuracy over communication rounds (mean over seeds)")
    return _save(fig, path)


def plot_accuracy_vs_steps(
    panels: Mapping[tuple[str, str], Mapping[str, Sequence[tuple[int, Interval]]]],
    rows: Sequence[SummaryRow],
    path: Path,
) -> Path:
    """Accuracy against cumulative sequential local steps (log2), a panel per (dataset, model), a
    line per series with its seeds' 95% t-interval shaded. If K only cost steps, every K would
    fall on K = 1's line: the federated penalty, if any, is the gap at equal steps."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    datasets = sorted({d for d, _ in panels})
    models = sorted({m for _, m in panels})
    labels = sorted({label for series in panels.values() for label in series}, key=_series_order)
    main = [label for label in labels if _is_main(label)]
    cmap, extra = colormaps["viridis"], colormaps["tab10"]
    colour = {label: cmap(0.85 * i / max(len(main) - 1, 1)) for i, label in enumerate(main)}
    colour.update({label: extra((i + 1) % 10) for i, label in enumerate(x for x in labels if x not in colour)})
    fig = Figure(figsize=(_width(4.2, datasets), 3.2 * len(models) + 0.8), layout="constrained")
    grid = fig.subplots(len(models), len(datasets), squeeze=False, sharey=True)
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax = grid[i][j]
            for label, points in sorted(panels.get((dataset, model), {}).items(), key=lambda kv: _series_order(kv[0])):
                if not points:
                    continue
                xs = [s for s, _ in points]
                ys = [a.mean for _, a in points]
                style = "-" if _is_main(label) else "--"
                ax.plot(xs, ys, style, marker="o", ms=3, color=colour[label], lw=1.5, label=label)
                half = [a.half_width or 0.0 for _, a in points]
                ax.fill_between(
                    xs,
                    [y - h for y, h in zip(ys, half, strict=True)],
                    [y + h for y, h in zip(ys, half, strict=True)],
                    color=colour[label],
                    alpha=0.15,
                    lw=0,
                )
            chance = [r.chance for r in rows if r.dataset == dataset]
            if chance:
                ax.axhline(chance[0][0], ls="--", color="0.4", lw=1, label=chance[0][1])
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())  # 64, not 2^6
            last_row = i == len(models) - 1
            _accuracy_panel(ax, f"{model} · {dataset}", "Sequential local SGD steps (log scale)" if last_row else "", j)
    _figure_legend(fig, [ax for row in grid for ax in row])
    fig.suptitle("Test accuracy against sequential steps (mean over seeds, 95% t-interval shaded)")
    return _save(fig, path)


def _accuracy_panel(ax: Axes, title: str, xlabel: str, column: int) -> None:
    """An accuracy panel of a grid: 0 to 1, a light grid, its title; the axis names on the edges only."""
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if column == 0:
        ax.set_ylabel("Test accuracy")


def _is_main(label: str) -> bool:
    """ "K = 4" is a main series; "K = 8, per-client heads" and the controls are not."""
    return label.startswith("K = ") and "," not in label


def _series_order(label: str) -> tuple[bool, int, str]:
    digits = "".join(ch for ch in label.removeprefix("K = ").split(",")[0] if ch.isdigit())
    return (not _is_main(label), int(digits or 0), label)
