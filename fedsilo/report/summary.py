"""The report's arithmetic: federation runs as `Curve`s in, one `SummaryRow` per (model, dataset, K) out.

Pure: no MLflow, no files, no matplotlib, so every number in the tables and figures can be checked by hand.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from fedsilo.errors import FedsiloError
from fedsilo.report.stats import binomial_se, t_interval
from fedsilo.runmeta import short_name

# The paper's target: 90% of the non-federated (K = 1) baseline accuracy at the budget.
TARGET_FRACTION = 0.9
# Accuracies are ratios of counts; 0.9 * 0.8 is 0.7200000000000001, which must count as reaching
# a logged 0.72.
_TOLERANCE = 1e-9

NOT_REACHED = "not reached"
NO_BASELINE = "no baseline"
# A K = 1 baseline at or below the floor (majority class, else a uniform guess) learned nothing:
# 90% of it is reached by any model that answers one class, so a round count would mislead.
BASELINE_AT_CHANCE = "baseline at chance"
# The names of the floor a row must beat (`SummaryRow.chance`), as the figures' legends show them.
RANDOM_LABEL = "random classifier"
MAJORITY_LABEL = "majority class"


class ReportError(FedsiloError):
    """MLflow holds nothing this report can summarise, or the runs contradict each other."""


@dataclass(frozen=True)
class Curve:
    """Test accuracy per round of one federation run, with the run's settings.

    `accuracy` maps round (MLflow step, from 1) to test accuracy. `budget` is the round at
    which "accuracy at the budget" is read; `threshold` the last round that counts for
    rounds-to-target (the paper's second threshold). `model` tells models apart (the path or hub
    id given); `model_name` is what people read (legends, tables), by default its last part.
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
    model_name: str = ""
    # What sets the run apart from its model's main series ("" for the main series): an ablation
    # ("per-client heads", "no attention mask") or the minibatch-SGD control of `minibatch_of` clients.
    variant: str = ""
    minibatch_of: int | None = None
    steps: Mapping[int, int] = field(default_factory=dict)  # round -> cumulative sequential steps
    test_examples: int | None = None

    @property
    def name(self) -> str:
        return self.model_name or short_name(self.model)

    @property
    def label(self) -> str:
        """The series in tables and legends: "K = 8", "K = 8, per-client heads", or the control's variant."""
        if self.minibatch_of is not None:
            return self.variant
        return f"K = {self.silos}" + (f", {self.variant}" if self.variant else "")

    @property
    def peer_silos(self) -> int:
        """The K whose main series this run stands beside: its own, or the K a control matches."""
        return self.silos if self.minibatch_of is None else self.minibatch_of


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
    model_name: str = ""  # for people; unique among the rows (`summarise`)
    baseline_at_chance: bool = False  # the K = 1 baseline did not beat `chance`: no rounds-to-target
    variant: str = ""  # as `Curve.variant`: "" is the model's main series
    label: str = ""  # as `Curve.label`
    accuracy_at_budget_ci: float | None = None  # half-width of the 95% t-interval over seeds
    test_examples: int | None = None  # the test set's rows, where every seed logged the same
    # Each seed's rounds to target (None: not reached within the threshold), in `seeds` order.
    seed_rounds: tuple[int | None, ...] = ()
    seed_curves: tuple[Mapping[int, float], ...] = field(default=(), repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.model_name or short_name(self.model)

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
        """The round number, "not reached" (within the threshold), "no baseline" or "baseline at chance"."""
        if self.baseline_at_chance:
            return BASELINE_AT_CHANCE
        if self.target_accuracy is None:
            return NO_BASELINE
        if self.rounds_to_target is None:
            return NOT_REACHED
        return str(self.rounds_to_target)

    @property
    def binomial_se(self) -> float | None:
        """What the finite test set alone adds to one accuracy at the budget (see `compare`)."""
        if self.accuracy_at_budget is None or not self.test_examples:
            return None
        return binomial_se(self.accuracy_at_budget, self.test_examples)

    @property
    def reached_text(self) -> str:
        """Rounds to target seed by seed: "reached k/n", with the median where at least half did
        (a seed that did not counts as later than every seed that did)."""
        if not self.seed_rounds:
            return self.rounds_text if self.target_accuracy is None else NOT_REACHED
        reached = sorted(r for r in self.seed_rounds if r is not None)
        n = len(self.seed_rounds)
        ordered = [float(r) for r in reached] + [math.inf] * (n - len(reached))
        median = statistics.median(ordered)
        middle = "" if math.isinf(median) else f", median {median:g}"
        return f"reached {len(reached)}/{n}{middle}"


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
    by_key: dict[tuple[str, str, int, str, int], list[Curve]] = defaultdict(list)
    for c in curves:
        by_key[(c.model, c.dataset, c.silos, c.variant, c.seed)].append(c)
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


def _summarise_group(key: tuple[str, str, int, str], curves: Sequence[Curve]) -> SummaryRow:
    """Everything about one (model, dataset, K, variant) except the baseline-dependent fields."""
    model, dataset, silos, variant = key
    where = f"model {model!r}, dataset {dataset!r}, {curves[0].label}"
    curves = sorted(curves, key=lambda c: c.seed)
    budget = _one_value((c.budget for c in curves), "budget", where)
    threshold = _one_value((c.threshold for c in curves), "threshold", where)
    num_labels = _one_value((c.num_labels for c in curves), "num_labels", where)

    at_budget = [accuracy_at(c.accuracy, budget) for c in curves]
    present = [a for a in at_budget if a is not None]
    # A mean over only the seeds that reached the budget would be a different population.
    complete = len(present) == len(at_budget)
    acc = statistics.fmean(present) if complete else None
    std = statistics.stdev(present) if complete and len(present) > 1 else None
    ci = t_interval(present).half_width if complete and present else None
    sizes = {c.test_examples for c in curves}

    curve = mean_curve([c.accuracy for c in curves])
    best = best_point(curve)
    return SummaryRow(
        model=model,
        model_name=curves[0].name,
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
        variant=variant,
        label=curves[0].label,
        accuracy_at_budget_ci=ci,
        test_examples=sizes.pop() if len(sizes) == 1 else None,
        seed_curves=tuple(c.accuracy for c in curves),
    )


def summarise(curves: Iterable[Curve]) -> list[SummaryRow]:
    """One row per (model, dataset, K), sorted by dataset, model, K.

    Seeds are averaged: accuracy at the budget is the mean (and sample std) of each seed's value;
    best accuracy and rounds-to-target are read off the seed-mean curve. The target is
    `TARGET_FRACTION` x the K = 1 row's accuracy at its budget, for the same model and dataset.
    Raises ReportError if the seeds of one group disagree on budget, threshold or num_labels,
    or the runs of one dataset disagree on num_labels.
    """
    groups: dict[tuple[str, str, int, str], list[Curve]] = defaultdict(list)
    for c in curves:
        groups[(c.model, c.dataset, c.silos, c.variant)].append(c)
    order = sorted(groups, key=lambda k: (k[1], k[0], k[3] != "", k[2], k[3]))  # dataset, model, main first, K
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
    rows = [
        replace(r, majority_accuracy=next(iter(majorities[r.dataset]))) if len(majorities[r.dataset]) == 1 else r
        for r in rows
    ]

    baselines = {
        (r.model, r.dataset): r.accuracy_at_budget
        for r in rows
        if r.silos == 1 and not r.variant and r.accuracy_at_budget is not None
    }
    return _unique_names([_with_target(row, baselines.get((row.model, row.dataset))) for row in rows])


def _unique_names(rows: list[SummaryRow]) -> list[SummaryRow]:
    """Two models with one short name (two folders called `model`) are shown by what was given."""
    models_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        models_of[r.name].add(r.model)
    return [r if len(models_of[r.name]) == 1 else replace(r, model_name=r.model) for r in rows]


def _with_target(row: SummaryRow, baseline: float | None) -> SummaryRow:
    if baseline is None:
        return row
    if baseline <= row.chance[0] + _TOLERANCE:
        return replace(row, baseline_at_chance=True)
    target = TARGET_FRACTION * baseline
    return replace(
        row,
        target_accuracy=target,
        rounds_to_target=rounds_to_target(row.mean_curve, target, row.threshold),
        seed_rounds=tuple(rounds_to_target(c, target, row.threshold) for c in row.seed_curves),
    )
