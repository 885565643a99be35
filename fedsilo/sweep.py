"""``fedsilo sweep``: a grid of simulations, one MLflow parent run with a nested run per cell.

A sweep file names fixed ``settings``, a ``grid`` whose keys vary (every combination is a cell,
in the order written) and ``per_dataset`` overrides such as the paper's round budgets. Each cell
is one :func:`fedsilo.simulate.simulate` run. A cell is known by a key hashed from the settings
that decide its result, so a restarted sweep finds its parent run again and skips the cells that
already finished; a cell interrupted mid-way resumes from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsilo.config import (
    SECTIONS,
    Settings,
    TrainConfig,
    agreed_settings,
    build_settings,
    fingerprint,
    read_yaml_mapping,
)
from fedsilo.errors import EX_RETRY, ConfigError, FedsiloError, first_line
from fedsilo.ledger import discard_finished, simulation_key
from fedsilo.progress import Log, time_left
from fedsilo.runmeta import code_tags
from fedsilo.simulate import simulate
from fedsilo.tracking import (
    CELL_TAG,
    MINIBATCH_PARAM,
    PARENT_RUN_TAG,
    PARENT_TAG,
    SWEEP_KEY_TAG,
    get_or_create_experiment,
    redact_uri,
    search_all_runs,
)

SETTING_KEYS = frozenset(key for section in SECTIONS.values() for key in section.model_fields)
# Sweep-only keys, logged as params of each cell for `fedsilo report`: accuracy is read at the
# budget round; the run goes on to the threshold (the paper's second threshold) for
# rounds-to-target.
EXTRA_KEYS = frozenset({"budget", "threshold"})
# `silos: minibatch-K`: the minibatch-SGD control of K clients (see minibatch_control).
MINIBATCH_PREFIX = "minibatch-"
# One parent run holds every cell, so these are set once, at the top of the file.
TOP_LEVEL_KEYS = frozenset({"experiment", "tracking_uri", "jobs"})
CELL_KEYS = (SETTING_KEYS | EXTRA_KEYS) - TOP_LEVEL_KEYS


class SweepError(FedsiloError):
    """Some cells of a sweep failed; the others finished and a rerun retries only the failed."""

    exit_code = EX_RETRY


def _normalise(mapping: dict[str, Any]) -> dict[str, Any]:
    return {str(key).replace("-", "_"): value for key, value in mapping.items()}


def _check_keys(keys: Any, where: str) -> None:
    for key in keys:
        if key in TOP_LEVEL_KEYS:
            raise ValueError(f"{where}.{key}: set '{key}' at the top level of the sweep file (one per sweep)")
        if key not in CELL_KEYS:
            raise ValueError(
                f"{where}.{key}: unknown key (settings keys as in `fedsilo simulate --help`, "
                f"with underscores, or {', '.join(sorted(EXTRA_KEYS))})"
            )


class SweepSpec(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str | None = Field(
        None, min_length=1, description="MLflow experiment of the parent run and its cells. Default: the file's name."
    )
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    jobs: int = Field(
        1, ge=1, description="Cells run at once, each in its own process (e.g. several small simulations on one GPU)."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings every cell shares: flat keys as `fedsilo simulate` takes them, plus "
        "budget (the round at which accuracy is reported) and threshold (the last round; rounds "
        "defaults to it).",
    )
    grid: list[dict[str, list[Any]]] = Field(
        ...,
        description="Keys to vary, each with a list of values; every combination is a cell, "
        "the first key varying slowest. A list of such mappings is their union, in order: "
        "e.g. the main grid, then an ablation at one K. `silos: minibatch-K` is the "
        "minibatch-SGD control of K clients: one client whose batch is K times larger.",
    )
    per_dataset: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Overrides for the cells of one dataset (keyed by its `dataset` value exactly "
        "as written), e.g. rounds, budget and threshold.",
    )

    @field_validator("settings", mode="before")
    @classmethod
    def _underscores(cls, value: Any) -> Any:
        return _normalise(value) if isinstance(value, dict) else value

    @field_validator("grid", mode="before")
    @classmethod
    def _one_or_more_grids(cls, value: Any) -> Any:
        grids = [value] if isinstance(value, dict) else value
        return [_normalise(g) if isinstance(g, dict) else g for g in grids] if isinstance(grids, list) else value

    @field_validator("per_dataset", mode="before")
    @classmethod
    def _underscores_per_dataset(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): _normalise(v) if isinstance(v, dict) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        _check_keys(self.settings, "settings")
        if not self.grid:
            raise ValueError("grid: empty list; give at least one grid")
        datasets: set[str] = set()
        for index, grid in enumerate(self.grid):
            where = "grid" if len(self.grid) == 1 else f"grid[{index}]"
            _check_keys(grid, where)
            if not grid:
                raise ValueError(f"{where}: empty; name at least one key with a list of values")
            for key, values in grid.items():
                if not values:
                    raise ValueError(f"{where}.{key}: empty list")
                if key in self.settings:
                    raise ValueError(f"{where}.{key}: also set under settings; keep one")
            datasets |= {str(v) for v in grid.get("dataset", [self.settings.get("dataset")])}
        for dataset, overrides in self.per_dataset.items():
            _check_keys(overrides, f"per_dataset.{dataset}")
            if dataset not in datasets:
                raise ValueError(
                    f"per_dataset.{dataset}: no such dataset in the sweep (datasets: {', '.join(sorted(datasets))})"
                )
            for key in overrides:
                if any(key in grid for grid in self.grid):
                    raise ValueError(f"per_dataset.{dataset}.{key}: also a grid key; keep one")
        return self


@dataclass(frozen=True)
class Cell:
    """One simulation of the grid."""

    index: int  # 1-based, in grid order
    varying: dict[str, Any]  # this cell's grid values
    settings: Settings
    budget: int | None
    threshold: int | None
    key: str  # identifies the result: the same key is the same run
    minibatch_of: int | None = None  # the minibatch-SGD control of this many clients

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.varying.items())

    def params(self) -> dict[str, int]:
        given = (("budget", self.budget), ("threshold", self.threshold), (MINIBATCH_PARAM, self.minibatch_of))
        return {k: v for k, v in given if v is not None}


def read_spec(path: Path) -> SweepSpec:
    loaded = read_yaml_mapping(path, "sweep file", holds="(grid:, settings:, ...)")
    try:
        return SweepSpec(**loaded)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = list(first["loc"])
        if loc[:1] == ["grid"] and len(loc) > 1 and isinstance(loc[1], int):  # one grid of a list
            loc[:2] = ["grid" if isinstance(loaded.get("grid"), dict) else f"grid[{loc[1]}]"]
        where = ".".join(str(part) for part in loc)
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"sweep file {path}: {where + ': ' if where else ''}{message}") from None


def cell_key(settings: Settings, budget: int | None, threshold: int | None) -> str:
    """Hash of what decides a cell's result; where it runs (device, MLflow, paths) is left out."""
    return fingerprint(
        json.dumps({"settings": agreed_settings(settings), "budget": budget, "threshold": threshold}, sort_keys=True)
    )


def sweep_key(cells: list[Cell]) -> str:
    """The same set of cells is the same sweep, whatever the file looks like."""
    return fingerprint(" ".join(sorted(c.key for c in cells)))


def minibatch_control(flat: dict[str, Any], where: str) -> int | None:
    """Turn ``silos: minibatch-K`` into its run, in place, and return K (None for any other silos).

    The minibatch-SGD control of K i.i.d. clients is one client whose batch is K times theirs: a
    round then takes as many sequential steps as each of the K clients takes on its 1/K of the
    rows, and each step averages as many examples' gradients as the K clients' steps together. So
    it has K clients' steps and batch without their averaging of separately trained models."""
    value = flat.get("silos")
    if not isinstance(value, str) or not value.startswith(MINIBATCH_PREFIX):
        return None
    clients = value.removeprefix(MINIBATCH_PREFIX)
    if not clients.isdigit() or int(clients) < 2:
        raise ConfigError(f"{where}: silos: {value!r} is not a control; write {MINIBATCH_PREFIX}K with K >= 2")
    batch = flat.get("batch_size", TrainConfig.model_fields["batch_size"].default)
    flat.update(silos=1, batch_size=batch * int(clients) if isinstance(batch, int) else batch)
    return int(clients)


def expand(spec: SweepSpec, experiment: str) -> list[Cell]:
    """Every cell of the grids, validated before anything runs (a typo in the last cell must not
    wait for hours of training)."""
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    combos = [dict(zip(grid, combo, strict=True)) for grid in spec.grid for combo in itertools.product(*grid.values())]
    for index, varying in enumerate(combos, start=1):
        flat = {**spec.settings, **varying}
        flat.update(spec.per_dataset.get(str(flat.get("dataset")), {}))
        where = f"cell {index}/{len(combos)} ({' '.join(f'{k}={v}' for k, v in varying.items())})"
        minibatch_of = minibatch_control(flat, where)
        budget, threshold = flat.pop("budget", None), flat.pop("threshold", None)
        for name, value in (("budget", budget), ("threshold", threshold)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where}: {name} must be a positive whole number of rounds, got {value!r}")
        if threshold is not None and flat.setdefault("rounds", threshold) != threshold:
            raise ConfigError(
                f"{where}: rounds ({flat['rounds']}) and threshold ({threshold}) disagree; "
                "a cell runs to its threshold, so set one of them"
            )
        flat.update(experiment=experiment, tracking_uri=spec.tracking_uri)
        try:
            settings = build_settings(flat)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if budget is not None and budget > settings.federation.rounds:
            raise ConfigError(f"{where}: budget {budget} is after the last round ({settings.federation.rounds})")
        key = cell_key(settings, budget, threshold)
        if key in seen:
            raise ConfigError(f"{where}: the same run as cell {seen[key]}; remove the repeated grid value")
        seen[key] = index
        cells.append(Cell(index, varying, settings, budget, threshold, key, minibatch_of))
    return cells


class SweepParent:
    """A sweep's parent run, found again by the sweep's key so that a restarted sweep continues it.

    Cells are ordinary :class:`~fedsilo.tracking.Tracker` runs nested with ``parent_run_id`` and
    tagged with their cell key; :meth:`finished_cells` tells which need no rerun. Unlike a cell's
    metrics, this needs MLflow reachable: without it there is no telling what is done.
    """

    def __init__(
        self, tracking_uri: str, experiment: str, key: str, *, name: str, spec: dict[str, Any], cells: int
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=tracking_uri)
        try:
            self.experiment_id = get_or_create_experiment(client, experiment)
            same_sweep = f"tags.`{PARENT_TAG}` = 'parent' and tags.`{SWEEP_KEY_TAG}` = '{key}'"
            previous = client.search_runs(
                [self.experiment_id], filter_string=same_sweep, order_by=["attributes.start_time DESC"], max_results=1
            )
            if previous:
                self.run_id = previous[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
            else:
                tags = {
                    PARENT_TAG: "parent",
                    SWEEP_KEY_TAG: key,
                    "mlflow.note.content": sweep_description(spec, cells),
                    **code_tags("sweep"),
                }
                self.run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
                params = [Param(k, v) for k, v in sweep_params(spec, cells).items()]
                for start in range(0, len(params), 100):  # at most 100 params in one log_batch
                    client.log_batch(self.run_id, params=params[start : start + 100])
                client.log_dict(self.run_id, spec, "sweep.yaml")
        except Exception as exc:  # noqa: BLE001 - transport, server and store errors alike
            raise ConfigError(redact_uri(f"cannot use MLflow at {tracking_uri}: {first_line(exc)}")) from None
        self.resumed = bool(previous)

    def finished_cells(self) -> dict[str, str]:
        """Cell key -> run id of this parent's FINISHED children."""
        mine = f"tags.`{PARENT_RUN_TAG}` = '{self.run_id}' and attributes.status = 'FINISHED'"
        runs = search_all_runs(self._client, self.experiment_id, mine)
        return {r.data.tags[CELL_TAG]: r.info.run_id for r in runs if CELL_TAG in r.data.tags}

    def log_progress(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._client.log_metric(self.run_id, key, value, step=step)

    def finish(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=status)

    def ui_hint(self) -> str:
        return f"sweep run {self.run_id} (experiment {self.experiment_id})"


def sweep_params(spec: dict[str, Any], cells: int) -> dict[str, str]:
    """The parent run's params: the settings every cell shares as they are, each grid key's values
    as ``grid/<key>`` (a JSON list), the per-dataset overrides (JSON) and the number of cells."""
    params = {
        key: json.dumps(value) if isinstance(value, list | dict) else str(value)
        for key, value in spec["settings"].items()
    }
    for index, grid in enumerate(spec["grid"]):
        prefix = "grid" if len(spec["grid"]) == 1 else f"grid/{index}"
        params.update({f"{prefix}/{key}": json.dumps(values) for key, values in grid.items()})
    if spec["per_dataset"]:  # one param: its keys are paths, which MLflow refuses in a param's name
        params["per_dataset"] = json.dumps(spec["per_dataset"])
    params.update(cells=str(cells), tracking_uri=redact_uri(spec["tracking_uri"]))
    return params


def sweep_description(spec: dict[str, Any], cells: int) -> str:
    """One paragraph for the parent run's page."""
    grids = " and of ".join(
        "; ".join(f"{key}: {', '.join(str(v) for v in values)}" for key, values in grid.items())
        for grid in spec["grid"]
    )
    return (
        f"A sweep of {cells} federation(s), each a nested run: every combination of {grids}. "
        "Summarise it with `fedsilo report`, which logs its tables and figures here under report/."
    )


def _prefixed(log: Log, prefix: str) -> Log:
    return lambda line: log(prefix + line)


def dry_run_lines(cells: list[Cell], experiment: str, *, estimate: bool, log: Log) -> None:
    """List the cells; with ``estimate``, each with its time from a probe of its workload
    (fedsilo.estimate), one probe per distinct workload."""
    from fedsilo.estimate import PROBE_BATCHES, Speed, probe, workload_key

    speeds: dict[tuple[object, ...], Speed] = {}
    total = 0.0
    for cell in cells:
        guess = ""
        if estimate:
            key = workload_key(cell.settings)
            if key not in speeds:
                speeds[key] = probe(cell.settings)
            seconds = speeds[key].cell_seconds(cell.settings)
            total += seconds
            guess = f", about {time_left(seconds)}"
        log(f"cell {cell.index}/{len(cells)}: {cell.label()} (rounds={cell.settings.federation.rounds}{guess})")
    if estimate:
        log(
            f"{len(cells)} cell(s) in experiment '{experiment}', about {time_left(total)} in all on this machine "
            f"(from {len(speeds)} probe(s) of {PROBE_BATCHES} batches); nothing was recorded (--dry-run)"
        )
    else:
        log(f"{len(cells)} cell(s) in experiment '{experiment}'; nothing was run (--dry-run)")


@dataclass(frozen=True)
class CellResult:
    """How one cell's simulation ended: its run and final accuracy, or the one line saying why not."""

    index: int
    run_id: str | None
    accuracy: float
    seconds: float
    error: str | None = None


def run_cell(cell: Cell, n: int, parent_run_id: str, log: Log) -> CellResult:
    """One cell as a nested run of the sweep's parent."""
    log(f"cell {cell.index}/{n}: {cell.label()}")
    started = time.perf_counter()
    try:
        outcome = simulate(
            cell.settings,
            _prefixed(log, f"  [{cell.index}/{n}] "),
            parent_run_id=parent_run_id,
            params=cell.params(),
            tags={CELL_TAG: cell.key},
        )
    except FedsiloError as exc:
        return CellResult(cell.index, None, math.nan, time.perf_counter() - started, str(exc))
    return CellResult(cell.index, outcome.run_id, outcome.final_accuracy, time.perf_counter() - started)


def _worker_start(threads: int) -> None:
    """A worker process of run_cells_at_once: its share of the cores, line progress (bars from
    several processes would overwrite each other), and SIGTERM unwinding like Ctrl-C so that
    its run is closed as KILLED when the sweep is stopped."""
    import torch

    torch.set_num_threads(threads)
    os.environ["TERM"] = "dumb"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt, as Ctrl-C does


def _worker_cell(job: tuple[Cell, int, str]) -> CellResult:
    cell, n, parent_run_id = job
    return run_cell(cell, n, parent_run_id, lambda line: print(line, flush=True))


def run_cells_at_once(cells: list[Cell], n: int, parent_run_id: str, jobs: int, log: Log) -> Iterator[CellResult]:
    """Up to ``jobs`` cells at a time, each in a process of its own (several simulations share one
    GPU well: each is small); results come in the order cells finish. Stopping the sweep stops
    the workers, whose runs close as KILLED."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"running {min(jobs, len(cells))} cell(s) at a time, {threads} CPU thread(s) each")
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_start, initargs=(threads,))
    try:
        yield from pool.imap_unordered(_worker_cell, [(cell, n, parent_run_id) for cell in cells])
        pool.close()
    except BaseException:
        pool.terminate()  # SIGTERM to each worker: its simulation unwinds and closes its run
        raise
    finally:
        pool.join()


def run_sweep(
    path: Path, *, dry_run: bool = False, estimate: bool = False, jobs: int | None = None, log: Log = print
) -> list[Cell]:
    """Run every cell not finished yet under one parent run, ``jobs`` at a time (default: the
    file's ``jobs``); returns the cells. With ``dry_run`` only list them (``estimate``: with their
    time, from a short probe)."""
    spec = read_spec(path)
    jobs = jobs or spec.jobs
    experiment = spec.experiment or path.stem
    cells = expand(spec, experiment)
    n = len(cells)
    if dry_run:
        dry_run_lines(cells, experiment, estimate=estimate, log=log)
        return cells

    parent = SweepParent(
        spec.tracking_uri, experiment, sweep_key(cells), name=path.stem, spec=spec.model_dump(mode="json"), cells=n
    )
    done = parent.finished_cells()
    todo = [c for c in cells if c.key not in done]
    log(
        f"{'continuing' if parent.resumed else 'starting'} {parent.ui_hint()}: {n} cell(s), "
        f"{n - len(todo)} finished already, {len(todo)} to run"
    )
    failures: list[str] = []
    ran = 0  # cells finished by this invocation
    started = time.perf_counter()
    by_index = {cell.index: cell for cell in cells}
    for cell in cells:
        if cell.key in done:
            log(f"cell {cell.index}/{n}: {cell.label()}: finished already (run {done[cell.key]}), skipping")
    try:
        results = (
            (run_cell(cell, n, parent.run_id, log) for cell in todo)
            if jobs == 1
            else run_cells_at_once(todo, n, parent.run_id, jobs, log)
        )
        for result in results:  # in the order they finish
            cell = by_index[result.index]
            head = f"cell {cell.index}/{n}: {cell.label()}"
            if result.error is not None:
                # Other cells may still work (another model, another dataset); a rerun retries this one.
                failures.append(f"cell {cell.index} ({cell.label()}): {result.error}")
                log(f"{head}: failed: {result.error}")
                continue
            if result.run_id is None:  # trained, but MLflow went away: not recorded as done
                failures.append(f"cell {cell.index} ({cell.label()}): MLflow was unreachable at the end")
                continue
            done[cell.key] = result.run_id
            ran += 1
            discard_finished(cell.settings, simulation_key(cell.settings, parent.run_id))
            parent.log_progress(cell.index, {"cells_finished": float(len(done)), "cells_failed": float(len(failures))})
            elapsed = time.perf_counter() - started
            # Cells differ (K, dataset, rounds): the mean so far is a rough guide, not a promise.
            left = len(todo) - ran - len(failures)
            remaining = f", about {time_left(elapsed / ran * left)} left" if left > 0 else ""
            log(
                f"{head}: test_accuracy={result.accuracy:.4f} after {cell.settings.federation.rounds} round(s) "
                f"({result.seconds:.0f}s; {len(done)}/{n} cells finished, {elapsed:.0f}s so far{remaining})"
            )
    except BaseException as exc:
        parent.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    parent.finish("FAILED" if failures else "FINISHED")
    default_uri = SweepSpec.model_fields["tracking_uri"].default
    store = "" if spec.tracking_uri == default_uri else f" --tracking-uri {redact_uri(spec.tracking_uri)}"
    if done:
        log(f"summarise it: fedsilo report --experiment {experiment}{store}")
    if failures:
        raise SweepError(f"{len(failures)} of {n} cell(s) failed; rerun the sweep to retry them. First: {failures[0]}")
    return cells
