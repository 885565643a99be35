"""Reading back a run's model, as fedsilo.mlmodel logs it (an MLflow transformers model)."""

from __future__ import annotations

import os
from pathlib import Path


def download_model(tracking_uri: str, run_id: str, into: Path) -> Path:
    """The run's MLflow model ``model``, downloaded into ``into``; returns its folder (MLmodel and
    the flavour's files: the Hugging Face weights and config in ``model/``)."""
    from mlflow.artifacts import download_artifacts

    # MLflow 3 finds a runs:/ URI's logged model through the process-wide store, whatever
    # tracking_uri says: point it at the store for the call.
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        return Path(
            download_artifacts(artifact_uri=f"runs:/{run_id}/model", dst_path=str(into), tracking_uri=tracking_uri)
        )
    finally:
        if saved is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def model_weights_dir(tracking_uri: str, run_id: str, into: Path) -> Path:
    """The Hugging Face directory (``from_pretrained``) of the run's model."""
    return download_model(tracking_uri, run_id, into) / "model"


def logged_model_names(tracking_uri: str, run_id: str) -> list[str]:
    """The names of the MLflow models logged by the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return [m.name for m in found]
