"""MLflow, used by the aggregator (or the simulation) only: silos' metrics reach it through the group.

A sweep is one parent run (tag ``fedsilo.sweep = "parent"``) with one nested federation run per
cell (``mlflow.parentRunId``); :class:`SweepParent` finds or starts the parent and tells which
cells already finished.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

from fedsilo.config import Settings
from fedsilo.errors import ConfigError

PARENT_TAG = "fedsilo.sweep"  # "parent" on a sweep's parent run (fedsilo.report reads it)
SWEEP_KEY_TAG = "fedsilo.sweep_key"  # which sweep a parent runs: restarts find it by this
CELL_TAG = "fedsilo.cell"  # which cell of its sweep a nested run computes
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class Tracker:
    """One MLflow run per federation; a resumed federation continues its run.

    ``parent_run_id`` nests a new run under a sweep's parent; ``params`` are logged beside the
    settings (a sweep's ``budget`` and ``threshold``); ``tags`` are set on a new run.
    """

    def __init__(
        self,
        settings: Settings,
        labels: list[str],
        run_id: str | None,
        *,
        parent_run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        import mlflow

        self._mlflow = mlflow
        self.uri = settings.tracking.tracking_uri
        mlflow.set_tracking_uri(self.uri)
        new_tags = {**(tags or {}), **({PARENT_RUN_TAG: parent_run_id} if parent_run_id else {})}
        try:
            experiment = mlflow.set_experiment(settings.tracking.experiment)
            # Open on the runs table rather than the GenAI overview.
            mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")
            run = mlflow.start_run(run_id=run_id, tags=None if run_id else new_tags)
        except Exception as exc:
            raise ConfigError(f"cannot use MLflow at {self.uri}: {_first_line(exc)}") from None
        self.experiment_id = experiment.experiment_id
        self.run_id = run.info.run_id
        if run_id is None:
            logged: dict[str, Any] = {**settings.flat(), "num_labels": len(labels), **(params or {})}
            mlflow.log_params({k: "" if v is None else v for k, v in logged.items()})
            mlflow.log_dict({"labels": labels}, "labels.json")

    def log_round(self, round_: int, metrics: dict[str, float]) -> None:
        self._mlflow.log_metrics(metrics, step=round_)

    def log_model(self, model: Any, tokenizer: Any) -> None:
        """The global model as ``model/``, loadable with ``from_pretrained``."""
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            self._mlflow.log_artifacts(tmp, artifact_path="model")

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)

    def ui_hint(self) -> str:
        store = self.uri if self.uri.startswith("sqlite:") else None
        command = f"mlflow ui --backend-store-uri {store}" if store else f"open {self.uri}"
        return (f"MLflow run {self.run_id} (experiment {self.experiment_id}); to browse it: "
                f"{command}, then http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}")



class SweepParent:
    """A sweep's parent run, found again by the sweep's key so that a restarted sweep continues it.

    Children are ordinary :class:`Tracker` runs nested with ``parent_run_id=parent.run_id`` and
    tagged with their cell key; :meth:`finished_cells` lists the cells that need no rerun.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep_key: str, *, name: str,
                 spec: Mapping[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self._client = client = MlflowClient(tracking_uri=tracking_uri)
        try:
            found = client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
            same_sweep = (f"tags.`{PARENT_TAG}` = 'parent' and tags.`{SWEEP_KEY_TAG}` = '{sweep_key}'")
            previous = client.search_runs([self.experiment_id], filter_string=same_sweep,
                                          order_by=["attributes.start_time DESC"], max_results=1)
            if previous:
                self.run_id = previous[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
            else:
                run = client.create_run(self.experiment_id, run_name=name,
                                        tags={PARENT_TAG: "parent", SWEEP_KEY_TAG: sweep_key})
                self.run_id = run.info.run_id
                client.log_dict(self.run_id, dict(spec), "sweep.yaml")
        except Exception as exc:
            raise ConfigError(f"cannot use MLflow at {self.uri}: {_first_line(exc)}") from None
        self.resumed = bool(previous)

    def finished_cells(self) -> dict[str, str]:
        """Cell key -> run id of this parent's FINISHED children (the latest one per cell)."""
        mine = f"tags.`{PARENT_RUN_TAG}` = '{self.run_id}' and attributes.status = 'FINISHED'"
        done: dict[str, str] = {}
        token: str | None = None
        while True:
            page = self._client.search_runs([self.experiment_id], filter_string=mine, max_results=1000,
                                            order_by=["attributes.start_time ASC"], page_token=token)
            for run in page:
                if CELL_TAG in run.data.tags:
                    done[run.data.tags[CELL_TAG]] = run.info.run_id
            token = page.token
            if not token:
                return done

    def log_progress(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._client.log_metric(self.run_id, key, value, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)

    def ui_hint(self) -> str:
        return f"sweep run {self.run_id} (experiment {self.experiment_id})"
