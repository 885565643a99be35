"""One federation's life in one object: its checkpoint, its MLflow run, its rounds, its end.

The aggregator and the simulation both run a federation through a :class:`FederationRun`,
built once and called per round, so resume, "finished: deliver, then start anew", logging and
the run's final status are written once:

    with FederationRun(settings, key, log) as ledger:   # reads the checkpoint at once
        ledger.open(labels, flat_size(model))           # resume or start
        ledger.restore(model)                           # a resumed federation's weights
        ledger.track(params)                            # the MLflow run, new or continued
        for round_ in range(ledger.start_round, rounds + 1):
            ...
            ledger.record(round_, weights, metrics, server_state)  # log, then checkpoint
        return ledger.close(model, tokenizer, weights)  # the model to MLflow, run FINISHED

Leaving the block by an exception marks the run FAILED (KILLED for Ctrl-C or SIGTERM). Every
read of the checkpoint directory and of the federation's key happens here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from fedsilo import checkpoint
from fedsilo.config import Settings, fingerprint, settings_fingerprint
from fedsilo.errors import FederationError
from fedsilo.model import load_flat
from fedsilo.progress import Log, time_left
from fedsilo.runmeta import RunContext
from fedsilo.tracking import Tracker, redact_uri, round_line


@dataclass(frozen=True)
class Outcome:
    """What a finished federation leaves its caller."""

    run_id: str | None  # None only if MLflow was unreachable throughout (see Tracker)
    final_accuracy: float
    weights: torch.Tensor  # the final global model, flat, on the CPU


def simulation_key(settings: Settings, parent_run_id: str | None = None) -> str:
    """Where a simulation checkpoints: apart from ``fedsilo run`` federations with the same
    settings, and per MLflow experiment and sweep, so a resume never continues another's run."""
    blob = json.dumps(
        [settings_fingerprint(settings), settings.tracking.tracking_uri, settings.tracking.experiment, parent_run_id]
    )
    return "simulate-" + fingerprint(blob)


def discard_finished(settings: Settings, key: str) -> None:
    """Remove a finished federation's checkpoint: its model is in MLflow, and a checkpoint per sweep
    cell adds up (the paper grid's 54 cells: ~14 GB). Anything else beside it is tracking data
    waiting for MLflow: then everything stays."""
    path = checkpoint.checkpoint_path(settings.checkpoint.checkpoint_dir, key)
    if path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]:
        path.unlink()
        path.parent.rmdir()


class FederationRun:
    """A federation's checkpoint and MLflow run, from resume to its final status (module docstring)."""

    def __init__(self, settings: Settings, key: str, log: Log = print, *, parent_run_id: str | None = None) -> None:
        """``key`` names the federation (its checkpoint folder); ``parent_run_id`` nests its MLflow
        run under a sweep's parent run.

        The checkpoint is read here, first: a corrupt one must stop us before anything slow
        starts or any silo is admitted.
        """
        self.settings, self.key, self.log, self.parent_run_id = settings, key, log, parent_run_id
        self.directory = settings.checkpoint.checkpoint_dir
        checkpoint.ensure_writable(self.directory)
        self.resumed = checkpoint.load(self.directory, key)
        self.labels: list[str] = []
        self.tracker: Tracker | None = None
        self.final_accuracy = float("nan")
        self.last_round = settings.federation.rounds  # open() may end it earlier (a privacy budget)
        self.closed = False
        self._round_seconds: list[float] = []  # this process's rounds, for the time left

    @property
    def path(self) -> Path:
        return checkpoint.checkpoint_path(self.directory, self.key)

    @property
    def server_state(self) -> dict[str, torch.Tensor]:
        """A resumed federation's server optimiser state (see :mod:`fedsilo.server_opt`); empty when
        starting anew or for FedAvg."""
        return self.resumed.server_state if self.resumed else {}

    @property
    def start_round(self) -> int:
        return self.resumed.round + 1 if self.resumed else 1

    def _tracker(
        self,
        run_id: str | None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        context: RunContext | None = None,
    ) -> Tracker:
        return Tracker(
            self.settings,
            self.labels,
            run_id,
            self.path.parent,
            self.log,
            parent_run_id=self.parent_run_id,
            params=dict(params or {}),
            tags=dict(tags or {}),
            context=context,
        )

    # -- start -----------------------------------------------------------------------------------
    def open(
        self,
        labels: list[str],
        size: int,
        *,
        must_deliver: bool = False,
        last_round: int | None = None,
        why: str | None = None,
    ) -> int:
        """Resume or start; returns the first round to run. ``last_round``: the federation ends after it
        (default --rounds; earlier when a silo's privacy budget ends it, which ``why`` says).

        A checkpoint must fit this model and label set (the files behind --model may have
        changed). One of a finished federation starts a new one, after what MLflow missed of it
        is delivered; with ``must_deliver`` that delivery must succeed, else the old
        federation's results would end up in the new one's run.
        """
        self.labels = labels
        self.last_round = last_round or self.settings.federation.rounds
        if why:
            early = self.last_round < self.settings.federation.rounds
            self.log(f"{why}: the federation ends after round {self.last_round}" if early else why)
        if self.resumed is not None:
            checkpoint.check_fits(self.resumed, self.directory, labels, size, lora=self.settings.model.peft == "lora")
            if self.resumed.round >= self.last_round:
                if not self._tracker(self.resumed.run_id).finish() and must_deliver:
                    raise FederationError(
                        f"the last federation with these settings finished, but its results still wait in "
                        f"{self.path.parent} for MLflow at {redact_uri(self.settings.tracking.tracking_uri)}; start again "
                        "once it is reachable"
                    )
                self.resumed = None
        return self.start_round

    def restore(self, model: torch.nn.Module) -> None:
        """Put a resumed federation's global weights into ``model``; nothing when starting anew."""
        if self.resumed is not None:
            load_flat(model, self.resumed.weights.to(next(model.parameters()).device))
            self.log(f"resuming after round {self.resumed.round} from {self.path}")

    def track(
        self,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        context: RunContext | None = None,
    ) -> None:
        """Create the MLflow run, or continue a resumed federation's; ``params`` and ``tags`` are
        recorded beside the settings of a new one, which ``context`` names and describes."""
        self.tracker = self._tracker(self.resumed.run_id if self.resumed else None, params, tags, context)
        self.log(self.tracker.started_line())

    # -- each round ------------------------------------------------------------------------------
    def record(
        self,
        round_: int,
        weights: torch.Tensor,
        metrics: dict[str, float],
        server_state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """A finished round: metrics to MLflow (through the outbox), then the checkpoint (with the
        server optimiser's state), then the round's line. A crash between the two repeats the
        round, whose metrics MLflow then skips."""
        assert self.tracker is not None, "track() first"
        self.tracker.log_round(round_, metrics)
        state = checkpoint.Checkpoint(
            round_, weights, self.tracker.run_id, self.labels, self.key, dict(server_state or {})
        )
        checkpoint.save(self.directory, state)
        self.final_accuracy = metrics["test_accuracy"]
        self._round_seconds.append(metrics["round_seconds"])
        left = self.last_round - round_
        mean = sum(self._round_seconds) / len(self._round_seconds)
        estimate = f"; about {time_left(mean * left)} left" if left else ""
        self.log(round_line(round_, self.last_round, metrics) + estimate)

    # -- end -------------------------------------------------------------------------------------
    def close(self, model: torch.nn.Module, tokenizer: Any, weights: torch.Tensor) -> Outcome:
        """The final model to MLflow and the run FINISHED; what MLflow does not take now waits in
        the outbox for the next start with the same settings."""
        assert self.tracker is not None, "track() first"
        self.tracker.log_model(model, tokenizer)
        self.tracker.finish()
        self.closed = True
        self.log(f"done: {self.tracker.ui_hint()}")
        return Outcome(self.tracker.run_id, self.final_accuracy, weights.cpu())

    def __enter__(self) -> FederationRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is not None and self.tracker is not None and not self.closed:
            self.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
