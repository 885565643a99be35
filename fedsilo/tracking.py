"""MLflow, used by the aggregator only: silos' metrics reach it through the group.

Tracking must never stop training. Every round's metrics are first appended to an outbox file
beside the checkpoint, then delivered; what MLflow does not accept (server down, network gone)
stays in the outbox and is delivered at the next round, at the end, or at the next start with
the same settings. Nothing is lost and, because delivery skips steps MLflow already holds,
nothing is logged twice after a crash.

It also owns the MLflow conventions the sweep and the report share (tag names, metric names, the
experiment's creation and where its artifacts go, reading every run, a URI fit to print), so that
writers and readers cannot drift apart. What a run says about itself (name, description, tags,
params, inputs) is fedsilo.runmeta's; the model as an MLflow model is fedsilo.mlmodel's.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsilo.config import Settings
from fedsilo.progress import Log
from fedsilo.runmeta import SILO_PREFIX, RunContext, data_inputs, description, run_params, run_tags

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

# Fail fast instead of MLflow's default minutes of HTTP retries: the outbox is our retry.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# MLflow's INFO lines (database set-up, each saved model component, the system metrics monitor)
# drown the round lines; its warnings and errors still show. Read when mlflow is first imported,
# which fedsilo does lazily, after this.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

# The metric whose history tells which rounds MLflow already holds.
STEP_MARKER = "round_seconds"
# The run param holding the test set's most-frequent-label share (the report's reference line);
# absent when the silos evaluate on their own held-out rows.
MAJORITY_PARAM = "test_majority_accuracy"
# The param of a sweep's minibatch-SGD control run: the number of clients whose steps it matches.
MINIBATCH_PARAM = "minibatch_of"
# The metric of each round's sequential local steps (the slowest client's), the report's step axis.
STEPS_METRIC = "local_steps"
# MLflow accepts at most 1000 metrics in one log_batch.
MAX_BATCH_METRICS = 1000
# A sqlite store keeps new experiments' artifacts in this folder beside the database file, not in
# ./mlruns of whatever directory fedsilo was started in.
ARTIFACTS_BESIDE_DB = "mlartifacts"
# The model card's file in the outbox, beside the model waiting for MLflow.
_CARD = "fedsilo-card.md"

# Run tags. A sweep's parent run carries PARENT_TAG = "parent" and its sweep's key; its cells are
# ordinary federation runs nested under it, each tagged with its cell's key.
PARENT_TAG = "fedsilo.sweep"  # "parent" on a sweep's parent run: the report tells it from the cells by this
SWEEP_KEY_TAG = "fedsilo.sweep_key"  # which sweep a parent runs: a restart finds it by this
CELL_TAG = "fedsilo.cell"  # which cell of its sweep a nested run computes
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag


def _first_line(exc: BaseException) -> str:
    """A short reason; MLflow's long messages end in the cause (``Caused by ...``), so keep both ends."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= 240 else f"{line[:100]} ... {line[-140:]}"


# scheme://user:password@ -> scheme://user:***@ (a password may be empty; it has no '/', '@' or space)
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:)[^/@\s]*@")


def redact_uri(text: str) -> str:
    """A URI, or a message that quotes one (MLflow's errors quote the full request URL), without
    passwords: fit for an error message, a log line or an MLflow param."""
    return _PASSWORD.sub(r"\g<head>***@", text)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: for a sqlite store, a folder per experiment under
    ARTIFACTS_BESIDE_DB beside the database; otherwise None, the server's or store's choice."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
    if str(database) in ("", ":memory:"):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (database.expanduser().resolve().parent / ARTIFACTS_BESIDE_DB / folder).as_uri()


def tracking_client(tracking_uri: str) -> MlflowClient:
    """A client of ``tracking_uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if it does not exist yet (its artifacts beside a
    sqlite database: :func:`artifact_location`)."""
    found = client.get_experiment_by_name(name)
    experiment_id = (
        found.experiment_id
        if found
        else client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    )
    # Open on the runs table rather than the GenAI overview.
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    return experiment_id


def search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """Every run of the experiment that matches ``filter_string``, across all result pages."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class Tracker:
    """One MLflow run per federation; a resumed federation continues its run."""

    def __init__(
        self,
        settings: Settings,
        labels: list[str],
        run_id: str | None,
        outbox: Path,
        log: Log = print,
        *,
        parent_run_id: str | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        context: RunContext | None = None,
    ) -> None:
        """``parent_run_id`` nests the run under a sweep's parent; ``params`` and ``tags`` are
        recorded beside the settings, and ``context`` (how this process runs) names and describes
        a new run. ``outbox`` is the folder for what waits for MLflow."""
        self.client = tracking_client(settings.tracking.tracking_uri)
        self.uri = redact_uri(settings.tracking.tracking_uri)  # what messages show: never a password
        self.settings, self.labels, self.log = settings, labels, log
        self.run_id = run_id
        self.experiment_id: str | None = None
        self.parent_run_id, self.extra_params, self.tags = parent_run_id, params or {}, tags or {}
        # Without a context (tests, a finished federation's leftovers) the settings say what they can.
        self.context = context or RunContext("federation", settings.train.device, None)
        self._monitor: Any = None  # MLflow's system metrics monitor, while the run is open here
        self.outbox = outbox
        self.outbox.mkdir(parents=True, exist_ok=True)
        self._pending = self.outbox / "outbox.jsonl"
        self._model_dir = self.outbox / "model-pending"
        self._merged_dir = self.outbox / "merged-model-pending"  # --log-merged-model
        self._warned: str | None = None  # the reason of the last warning, while MLflow is unreachable
        self._open()

    # -- connection ------------------------------------------------------------------------------
    def _open(self) -> bool:
        """Find or create the experiment and the run; False while MLflow is unreachable."""
        if self.experiment_id is not None:
            return True
        try:
            experiment_id = get_or_create_experiment(self.client, self.settings.tracking.experiment)
            resumed = self.run_id is not None
            if self.run_id is None:
                self.run_id = self._create_run(experiment_id)
            else:
                self.client.update_run(self.run_id, status="RUNNING")
        except Exception as exc:  # any transport or server error means: try again later
            self._unreachable(exc)
            return False
        self.experiment_id = experiment_id
        self._watch_system(resumed)
        return True

    def _create_run(self, experiment_id: str) -> str:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param

        tags = {**run_tags(self.settings, self.context), **self.tags}
        if self.parent_run_id:
            tags[PARENT_RUN_TAG] = self.parent_run_id
        name = tags.pop("mlflow.runName")
        run_id: str = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        params = {
            **run_params(self.settings, self.context, self.labels),
            "tracking_uri": self.uri,
            **self.extra_params,
        }
        # One log_batch takes at most 100 params.
        items = [Param(k, "" if v is None else str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])
        inputs = [
            DatasetInput(
                Dataset(d.name, d.digest, d.source_type, d.source, profile=d.profile),
                [InputTag("mlflow.data.context", d.context)],
            )
            for d in data_inputs(self.settings, self.context)
        ]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)
        self.client.log_dict(run_id, {"labels": self.labels}, "labels.json")
        return run_id

    def _watch_system(self, resumed: bool) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, ...) for this process, from a
        thread of MLflow's, while the run is open here; a resumed run continues their steps."""
        if not self.settings.tracking.system_metrics or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=resumed, tracking_uri=self.settings.tracking.tracking_uri
            )
            self._monitor.start()
        except Exception as exc:  # psutil missing, an old MLflow: the run goes on without them
            self.log(f"warning: no system metrics for this run: {_first_line(exc)}")
            self._monitor = None

    def _unreachable(self, exc: BaseException) -> None:
        # Warn once per outage, and again only when the reason changes (not once per round).
        reason = redact_uri(_first_line(exc))
        if reason != self._warned:
            self.log(
                f"warning: MLflow at {self.uri} is unreachable ({reason}); training goes on, "
                f"metrics wait in {self._pending} and are delivered when it is back"
            )
            self._warned = reason

    # -- metrics ---------------------------------------------------------------------------------
    def log_round(self, round_: int, metrics: dict[str, float]) -> None:
        record = {"step": round_, "timestamp": int(time.time() * 1000), "metrics": metrics}
        with self._pending.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.flush()

    def flush(self) -> bool:
        """Deliver everything waiting in the outbox; True when nothing is left."""
        if not self._open():
            return False
        try:
            self._deliver_metrics()
            self._deliver_model()
        except Exception as exc:
            self._unreachable(exc)
            return False
        if self._warned:
            self.log(f"MLflow at {self.uri} is back: delivered the metrics that were waiting")
            self._warned = None
        return True

    def _deliver_metrics(self) -> None:
        from mlflow.entities import Metric

        if not self._pending.exists():
            return
        records = [json.loads(line) for line in self._pending.read_text(encoding="utf-8").splitlines() if line]
        assert self.run_id is not None
        held = {m.step for m in self.client.get_metric_history(self.run_id, STEP_MARKER)}
        # One log_batch is one transaction; whole rounds go into a batch, the marker last, so a
        # crash between batches leaves every round either fully delivered or not at all.
        batches: list[list[Metric]] = [[]]
        for r in records:
            if r["step"] in held:
                continue
            held.add(r["step"])  # a round repeated after a crash sits twice in the outbox
            items = sorted(r["metrics"].items(), key=lambda item: item[0] == STEP_MARKER)
            metrics = [Metric(key, float(value), r["timestamp"], r["step"]) for key, value in items]
            if len(batches[-1]) + len(metrics) > MAX_BATCH_METRICS:
                batches.append([])
            batches[-1].extend(metrics)
        for batch in batches:
            if batch:
                self.client.log_batch(self.run_id, metrics=batch)
        self._pending.unlink()

    # -- model -----------------------------------------------------------------------------------
    def log_model(self, model: Any, tokenizer: Any) -> None:
        """The global model as the run's MLflow model ``model`` (fedsilo.mlmodel): first saved to
        the outbox with its card, then delivered like the metrics."""
        card = description(self.settings, self.context) + "\n"
        shutil.rmtree(self._model_dir, ignore_errors=True)
        model.save_pretrained(self._model_dir)
        tokenizer.save_pretrained(self._model_dir)
        (self._model_dir / _CARD).write_text(card, encoding="utf-8")
        if self.settings.tracking.log_merged_model:
            # on a copy: the federation's model keeps its adapters (and its flat binding)
            shutil.rmtree(self._merged_dir, ignore_errors=True)
            copy.deepcopy(model).merge_and_unload().save_pretrained(self._merged_dir)
            tokenizer.save_pretrained(self._merged_dir)
            (self._merged_dir / _CARD).write_text(
                card + "The LoRA adapters merged into their base.\n", encoding="utf-8"
            )
        self.flush()

    def _deliver_model(self) -> None:
        from fedsilo.mlmodel import MERGED_NAME, MODEL_NAME

        # the adapters first; a merged model, where there is one, is the one registered
        merged = self._merged_dir.exists() or self.settings.tracking.log_merged_model
        self._deliver_model_dir(self._model_dir, MODEL_NAME, None if merged else self.settings.tracking.register_model)
        self._deliver_model_dir(self._merged_dir, MERGED_NAME, self.settings.tracking.register_model)

    def _deliver_model_dir(self, directory: Path, artifact: str, register_as: str | None) -> None:
        if not directory.exists():
            return
        from fedsilo.mlmodel import log_classifier

        assert self.run_id is not None and self.experiment_id is not None
        card = directory / _CARD
        version = log_classifier(
            self.settings.tracking.tracking_uri,
            self.experiment_id,
            self.run_id,
            directory,
            card.read_text(encoding="utf-8") if card.exists() else "",
            register_as,
            artifact,
        )
        shutil.rmtree(directory)
        if version is not None:
            self.log(f"registered the model as {register_as} version {version}")

    def finish(self, status: str = "FINISHED") -> bool:
        """Deliver what waits and close the run; False (results kept locally) while MLflow is unreachable."""
        if self._monitor is not None:  # its last samples go before the run closes
            self._monitor.finish()
            self._monitor = None
        if self.flush():
            assert self.run_id is not None
            try:
                self.client.set_terminated(self.run_id, status)
                return True
            except Exception as exc:
                self._unreachable(exc)
        self.log(
            f"warning: MLflow is still unreachable; results are kept in {self.outbox} and delivered "
            "at the next start with the same settings"
        )
        return False

    def started_line(self) -> str:
        """The run's one line at the start; :meth:`ui_hint` says how to browse it at the end."""
        if self.run_id is None or self.experiment_id is None:
            return f"MLflow run not created yet ({self.uri} unreachable)"
        return f"MLflow run {self.run_id} in experiment '{self.settings.tracking.experiment}' at {self.uri}"

    def ui_hint(self) -> str:
        if self.run_id is None or self.experiment_id is None:
            return f"MLflow run not created yet ({self.uri} unreachable)"
        command = f"mlflow ui --backend-store-uri {self.uri}" if self.uri.startswith("sqlite:") else f"open {self.uri}"
        return (
            f"MLflow run {self.run_id} (experiment {self.experiment_id}); to browse it: "
            f"{command}, then http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        )


def round_metrics(
    result: Any,
    reports: list[Any],
    accepted: list[int],
    skipped: list[str],
    seconds: float,
    local: dict[int, Any] | None = None,
) -> dict[str, float]:
    """The metrics every round logs, in the aggregator and in the simulation alike: the federation's
    unprefixed, then each silo's under SILO_PREFIX (its loss, its training time and, where the
    silos evaluate, ``local``: its accuracy on its own held-out rows)."""
    total = sum(r.examples for r in reports if r.rank in accepted)
    metrics = {
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "train_loss": sum(r.train_loss * r.examples for r in reports if r.rank in accepted) / total,
        "round_seconds": seconds,
        "silos_skipped": float(len(skipped)),
        "silos_sitting_out": float(sum(r.sits_out for r in reports)),
        # clients train side by side: the round adds the slowest one's steps to the sequential count
        STEPS_METRIC: float(max((r.steps for r in reports if r.rank in accepted), default=0)),
    }
    for r in reports:
        metrics[f"{SILO_PREFIX}/{r.rank}/train_loss"] = r.train_loss
        metrics[f"{SILO_PREFIX}/{r.rank}/train_seconds"] = r.train_seconds
    for rank, scores in sorted((local or {}).items()):
        metrics[f"{SILO_PREFIX}/{rank}/test_accuracy"] = scores.accuracy
        metrics[f"{SILO_PREFIX}/{rank}/test_loss"] = scores.loss
    return metrics


def round_line(round_: int, rounds: int, metrics: dict[str, float]) -> str:
    return (
        f"round {round_}/{rounds}: test_accuracy={metrics['test_accuracy']:.4f} "
        f"test_loss={metrics['test_loss']:.4f} train_loss={metrics['train_loss']:.4f} "
        f"({metrics['round_seconds']:.1f}s)"
    )
