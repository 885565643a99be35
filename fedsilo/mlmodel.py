"""The federation's final model as an MLflow model: a text-classification pipeline.

Logged with ``mlflow.transformers.log_model``, so that ``mlflow.pyfunc.load_model("runs:/ID/model")``
answers label names, ``mlflow.transformers.load_model`` gives the pipeline back, ``mlflow models
serve`` serves it, and a registry name makes it a new version of a registered model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

# The artifact path of the model in its run: runs:/<run id>/model; under LoRA with
# --log-merged-model, the adapters merged into their base too: runs:/<run id>/merged_model.
MODEL_NAME = "model"
MERGED_NAME = "merged_model"
# The example MLflow shows and validates serving with. Deliberately not a row of anyone's data:
# the model leaves the federation, the rows never do.
INPUT_EXAMPLE = ["An example sentence to classify."]
# What the pyfunc flavour needs to load the model elsewhere; given, so that MLflow does not infer
# them by loading the model again in a child process (tens of seconds).
_REQUIREMENTS = ("mlflow", "torch", "transformers")
# The model card's metadata (a card without it draws a warning from huggingface_hub).
CARD_HEADER = (
    "---\nlibrary_name: transformers\npipeline_tag: text-classification\ntags: [fedsilo, federated-learning]\n---\n"
    "# A text classifier trained by federated averaging (fedsilo)\n\n"
)


def pip_requirements() -> list[str]:
    pins = []
    for name in _REQUIREMENTS:
        try:
            # A local build tag (2.5.0+cpu) is no version pip can find: keep the public part.
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _signature() -> object:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    # Text in; the winning label's name and its probability out (the pipeline's own output).
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", name="label"), ColSpec("double", name="score")]),
    )


@contextlib.contextmanager
def _fluent_store(tracking_uri: str, experiment_id: str) -> Iterator[None]:
    """``log_model`` writes through MLflow's process-wide store and experiment (else the Default
    experiment): point them at the run's for the call only, through MLflow's own variables (and
    its process-wide URI, if a program embedding fedsilo set one), and quiet what it says at INFO
    (each saved component, the environment)."""
    import mlflow

    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    quiet = logging.getLogger("mlflow")
    level = quiet.level
    os.environ.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_ID=experiment_id)
    embedded = mlflow.get_tracking_uri()  # a URI set with mlflow.set_tracking_uri wins over the variable
    if embedded != tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    quiet.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        quiet.setLevel(level)
        if embedded != tracking_uri:
            mlflow.set_tracking_uri(embedded)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_classifier(
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    directory: Path,
    card: str,
    register_as: str | None = None,
    name: str = MODEL_NAME,
) -> str | None:
    """Log the model and tokenizer saved in ``directory`` (``save_pretrained``) as run ``run_id``'s
    model ``name``, with ``card`` as its model card; returns the new registered version, if any.

    The pipeline is built from the directory, on the CPU: what is logged is what was saved.
    """
    import mlflow
    from huggingface_hub import ModelCard
    from transformers import pipeline

    if (directory / "adapter_config.json").exists():
        # A LoRA model (--peft lora) is its adapter, which names its base: logged as the files
        # PeftModel.from_pretrained loads. Not a pipeline: transformers 5 saves a PEFT pipeline only
        # with peft >= 0.22, newer than this project's index offers.
        mlflow.MlflowClient(tracking_uri).log_artifacts(run_id, str(directory), name)
        return None

    # An absolute path as the model's name: MLflow looks a name up on the hub for its license,
    # which a path (more than one "/") fails at once, without a network.
    where = str(directory.resolve())
    classifier = pipeline("text-classification", model=where, tokenizer=where, device="cpu")
    with _fluent_store(tracking_uri, experiment_id):
        info = mlflow.transformers.log_model(
            classifier,
            name=name,
            run_id=run_id,
            task="text-classification",
            signature=_signature(),
            input_example=INPUT_EXAMPLE,
            pip_requirements=pip_requirements(),
            # Our own card: MLflow would otherwise look the model's name up on the hub.
            model_card=ModelCard(CARD_HEADER + card),
        )
        if register_as is None:
            return None
        # MLflow prints two lines of its own on stderr here; the caller prints one.
        with contextlib.redirect_stderr(io.StringIO()):
            return str(mlflow.register_model(info.model_uri, register_as).version)
