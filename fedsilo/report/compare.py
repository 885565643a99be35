"""Comparisons between series, pure like `summary`: paired differences on the same seeds, and
accuracy at an equal number of sequential SGD steps (the step axis).

Pairing runs by seed removes what two series share through the seed (the head drawn, the shards,
the batch order) from their difference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from fedsilo.report.stats import Interval, t_interval
from fedsilo.report.summary import Curve


def _series_key(c: Curve) -> tuple[int, str]:
    return c.silos, c.variant


@dataclass(frozen=True)
class Paired:
    """``first`` minus ``second`` at the budget round, paired by seed."""

    dataset: str
    first: str
    second: str
    round_: int
    difference: Interval
    seeds: tuple[int, ...]


def _at_budget(curves: Iterable[Curve]) -> dict[tuple[str, str, int, str], dict[int, tuple[float, int, str]]]:
    """(dataset, model, K, variant) -> seed -> (accuracy at the budget, budget, "model: series")."""
    found: dict[tuple[str, str, int, str], dict[int, tuple[float, int, str]]] = defaultdict(dict)
    for c in curves:
        if c.budget in c.accuracy:
            found[(c.dataset, c.model, c.silos, c.variant)][c.seed] = (
                c.accuracy[c.budget],
                c.budget,
                f"{c.name}: {c.label}",
            )
    return found


def _pair(
    dataset: str, a: Mapping[int, tuple[float, int, str]], b: Mapping[int, tuple[float, int, str]]
) -> Paired | None:
    seeds = sorted(set(a) & set(b))
    budgets = {a[s][1] for s in seeds} | {b[s][1] for s in seeds}
    if not seeds or len(budgets) != 1:  # no common seed, or not the same round to compare at
        return None
    diffs = [a[s][0] - b[s][0] for s in seeds]
    first, second = a[seeds[0]][2], b[seeds[0]][2]
    return Paired(dataset, first, second, budgets.pop(), t_interval(diffs), tuple(seeds))


def _parts(curve: Curve) -> frozenset[str]:
    """What a series adds to its model's main series ("LoRA r 8", "DP epsilon 8"); the minibatch
    control is one part."""
    if curve.minibatch_of is not None:
        return frozenset([curve.variant])
    return frozenset(part for part in curve.variant.split(", ") if part)


def paired_differences(curves: Sequence[Curve]) -> list[Paired]:
    """At the budget, on the seeds both have: every two models in the same series (dataset, K,
    variant), then every variant (an ablation, a control, DP) against the nearest series it adds to,
    at the K it stands beside (`Curve.peer_silos`): of those with some of its parts and none other
    (its model's main series has none), the ones with the most."""
    found = _at_budget(curves)
    out: list[Paired] = []
    by_series: dict[tuple[str, int, str], list[str]] = defaultdict(list)
    for dataset, model, silos, variant in sorted(found):
        by_series[(dataset, silos, variant)].append(model)
    for (dataset, silos, variant), models in by_series.items():
        for m1, m2 in combinations(models, 2):
            paired = _pair(dataset, found[(dataset, m1, silos, variant)], found[(dataset, m2, silos, variant)])
            out += [paired] if paired else []
    parts = {(c.dataset, c.model, c.silos, c.variant): _parts(c) for c in curves}
    peers = {(c.dataset, c.model, c.silos, c.variant): c.peer_silos for c in curves if c.variant}
    for key, peer in sorted(peers.items()):
        if key not in found:
            continue
        dataset, model = key[:2]
        below = [k for k in found if k[:3] == (dataset, model, peer) and parts[k] < parts[key]]
        nearest = max((len(parts[k]) for k in below), default=-1)
        for base in sorted(k for k in below if len(parts[k]) == nearest):
            paired = _pair(dataset, found[key], found[base])
            out += [paired] if paired else []
    return out


@dataclass(frozen=True)
class AtSteps:
    """A series at a round where its runs have taken as many sequential steps as K = 1's
    ``baseline_round``: both accuracies and their difference, paired by seed."""

    dataset: str
    model: str
    series: str
    steps: int
    round_: int
    baseline_round: int
    accuracy: Interval
    baseline: Interval
    difference: Interval
    seeds: tuple[int, ...]


def _steps_by_round(curves: Sequence[Curve]) -> dict[int, int]:
    """Round -> steps where every seed's run took the same number (i.i.d. shards: they all do)."""
    shared = set(curves[0].steps.items()).intersection(*(c.steps.items() for c in curves[1:]))
    return dict(sorted(shared))


def at_equal_steps(curves: Sequence[Curve]) -> list[AtSteps]:
    """Every series of each (dataset, model) against the main K = 1 runs at the same sequential
    step count, wherever a round of each ends on it (runs that logged no steps have none)."""
    groups: dict[tuple[str, str], dict[tuple[int, str], list[Curve]]] = defaultdict(lambda: defaultdict(list))
    for c in curves:
        if c.steps:
            groups[(c.dataset, c.model)][_series_key(c)].append(c)
    out: list[AtSteps] = []
    for (dataset, _model), series in sorted(groups.items()):
        baseline = series.get((1, ""))
        if not baseline:
            continue
        base_seed = {c.seed: c for c in baseline}
        base_round = {steps: round_ for round_, steps in _steps_by_round(baseline).items()}
        for key, runs in sorted(series.items()):
            if key == (1, ""):
                continue
            for round_, steps in _steps_by_round(runs).items():
                if steps not in base_round:
                    continue
                b = base_round[steps]
                seeds = sorted(
                    c.seed
                    for c in runs
                    if c.seed in base_seed and round_ in c.accuracy and b in base_seed[c.seed].accuracy
                )
                if not seeds:
                    continue
                mine = {c.seed: c.accuracy[round_] for c in runs}
                theirs = {s: base_seed[s].accuracy[b] for s in seeds}
                out.append(
                    AtSteps(
                        dataset,
                        runs[0].name,
                        runs[0].label,
                        steps,
                        round_,
                        b,
                        t_interval([mine[s] for s in seeds]),
                        t_interval([theirs[s] for s in seeds]),
                        t_interval([mine[s] - theirs[s] for s in seeds]),
                        tuple(seeds),
                    )
                )
    return out


def step_curves(curves: Sequence[Curve]) -> dict[tuple[str, str], dict[str, list[tuple[int, Interval]]]]:
    """(dataset, model name) -> series label -> (cumulative steps, accuracy over seeds) per round,
    for the step-axis figure; only rounds at which every seed took the same steps."""
    groups: dict[tuple[str, str], dict[tuple[int, str], list[Curve]]] = defaultdict(lambda: defaultdict(list))
    for c in curves:
        if c.steps:
            groups[(c.dataset, c.name)][_series_key(c)].append(c)
    out: dict[tuple[str, str], dict[str, list[tuple[int, Interval]]]] = {}
    for panel, series in sorted(groups.items()):
        out[panel] = {}
        for _, runs in sorted(series.items()):
            points = [
                (steps, t_interval([c.accuracy[round_] for c in runs]))
                for round_, steps in _steps_by_round(runs).items()
                if all(round_ in c.accuracy for c in runs)
            ]
            out[panel][runs[0].label] = points
    return out
