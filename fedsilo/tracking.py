"""MLflow, used by the aggregator only: silos' metrics reach it through the group."""

from __future__ import annotations

import tempfile
from typing import Any

from fedsilo.config import Settings
from fedsilo.errors import ConfigError


class Tracker:
    """One MLflow run per federation; a resumed federation continues its run."""

    def __init__(self, settings: Settings, labels: list[str], run_id: str | None) -> None:
        import mlflow

        self._mlflow = mlflow
        self.uri = settings.tracking.tracking_uri
        mlflow.set_tracking_uri(self.uri)
        try:
            experiment = mlflow.set_experiment(settings.tracking.experiment)
            # Open on the runs table rather than the GenAI overview.
            mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")
            run = mlflow.start_run(run_id=run_id)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"cannot use MLflow at {self.uri}: {first}") from None
        self.experiment_id = experiment.experiment_id
        self.run_id = run.info.run_id
        if run_id is None:
            params: dict[str, Any] = {**settings.flat(), "num_labels": len(labels)}
            mlflow.log_params({k: "" if v is None else v for k, v in params.items()})
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

