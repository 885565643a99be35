"""What a federation's MLflow run says about itself: its name, description, tags, params and inputs.

Everything here is computed once, when the run is created (:class:`fedsilo.tracking.Tracker`), from
the settings and a :class:`RunContext` that only the process starting the run knows (the device it
resolved, the wire it formed, the examples each silo holds). Pure but for reading the data files
for their digest and asking git for the commit: no MLflow calls, so it is cheap to test.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsilo import __version__
from fedsilo.config import Settings

# The extensions fedsilo reads data from (fedsilo.data), dropped from a dataset's short name.
_DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
# Tags of the libraries that decide a run's numbers; with fedsilo's own version and commit they
# say which code produced a run.
_LIBRARIES = ("torch", "transformers", "mlflow")
# A file is read in pieces this large to hash it.
_CHUNK = 1 << 20
# Per-silo metrics and params are named SILO_PREFIX/<rank>/<name>: the federation's own metrics
# (test_accuracy, ...) stay unprefixed, first in MLflow's charts, and each silo's sit in one group.
SILO_PREFIX = "silo"


@dataclass(frozen=True)
class RunContext:
    """What the process that creates the run knows beyond the settings."""

    mode: str  # "simulate" or "aggregator"
    device: str  # the device actually used ("cpu", "cuda"), never "auto"
    backend: str | None  # the wire actually used (gloo, nccl, tls); None in a simulation
    silo_examples: dict[int, int] = field(default_factory=dict)  # training examples per silo rank
    test_examples: int | None = None  # None: the silos evaluate on their own held-out rows
    megabytes_per_round: float | None = None  # one silo's traffic per round, down and up; None: no wire


def short_name(reference: str) -> str:
    """A model's or dataset's name for people: the last part of a hub id or path, less a data
    file's extension (``data/minilm`` -> ``minilm``, ``org/all-MiniLM-L6-v2`` -> ``all-MiniLM-L6-v2``,
    ``data/rotten_tomatoes.csv`` -> ``rotten_tomatoes``)."""
    name = reference.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or reference
    for suffix in _DATA_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _dataset_name(settings: Settings) -> str:
    return short_name(settings.data.dataset) if settings.data.dataset else "private data"


def run_name(settings: Settings) -> str:
    """``K=4 minilm rotten_tomatoes seed=0``: what tells runs of a sweep apart at a glance."""
    return (
        f"K={settings.federation.silos} {short_name(settings.model.model)} {_dataset_name(settings)} "
        f"seed={settings.train.seed}"
    )


def description(settings: Settings, context: RunContext) -> str:
    """One paragraph for the run's page (MLflow's ``mlflow.note.content`` tag)."""
    fed, train, data = settings.federation, settings.train, settings.data
    examples = sum(context.silo_examples.values())
    where = (
        f"simulated in one process on {context.device}"
        if context.backend is None
        else f"run by an aggregator on {context.device} over {context.backend}"
    )
    split = (
        "each silo training on its own data"
        if data.partition == "none"
        else f"{data.dataset} split {data.partition} among them"
    )
    evaluation = (
        f"evaluated after each round on {context.test_examples} held-out examples"
        if context.test_examples is not None
        else "evaluated after each round by the silos on their own held-out rows"
    )
    local = "plain SGD" if train.optimizer == "sgd" else "AdamW"
    server = settings.server.server_optimizer
    extras = [
        f"the server's {server} (server lr {settings.server.step_size:g})" if server != "fedavg" else "",
        f"FedProx mu {train.fedprox_mu:g}" if train.fedprox_mu else "",
        f"DP-SGD per silo ({_privacy(settings)})" if settings.privacy.enabled else "",
        "secure aggregation" if fed.secure_aggregation else "",
    ]
    extra = "".join(f", {e}" for e in extras if e)
    return (
        f"Federated Averaging of {short_name(settings.model.model)} ({settings.model.model}) over "
        f"K={fed.silos} silo(s), {split}"
        f"{f' ({examples} training examples)' if examples else ''}: {fed.rounds} round(s) of "
        f"{train.local_epochs} local epoch(s) of {local} (batch {train.batch_size}, lr {train.lr:g}, "
        f"seed {train.seed}){extra}, {where}, {evaluation}. fedsilo {__version__}."
    )


def _privacy(settings: Settings) -> str:
    privacy = settings.privacy
    budget = f"epsilon {privacy.dp_epsilon:g}, " if privacy.dp_epsilon is not None else ""
    sigma = f"sigma {privacy.dp_noise_multiplier:g}, " if privacy.dp_noise_multiplier is not None else ""
    return f"{budget}{sigma}delta {privacy.dp_delta:g}, clipping {privacy.dp_max_grad_norm:g}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(directory: Path = Path(__file__).parent) -> str | None:
    """The commit of the checkout fedsilo runs from; None for an installed wheel or without git.

    A dirty tree gets ``-dirty``: its numbers may come from code no commit holds."""
    try:
        head = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def code_tags(mode: str) -> dict[str, str]:
    """What ran a run and with which code (MLflow's own ``mlflow.*`` tags where it has one, so its
    UI shows them in their places)."""
    tags = {
        "mlflow.source.name": f"fedsilo {mode}",
        "mlflow.source.type": "LOCAL",
        "fedsilo.mode": mode,
        "fedsilo.version": __version__,
        "versions.python": platform.python_version(),
        **{f"versions.{name}": _version(name) for name in _LIBRARIES},
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_tags(settings: Settings, context: RunContext) -> dict[str, str]:
    """Name, description, and :func:`code_tags`."""
    return {
        "mlflow.runName": run_name(settings),
        "mlflow.note.content": description(settings, context),
        **code_tags(context.mode),
    }


def run_params(settings: Settings, context: RunContext, labels: list[str]) -> dict[str, Any]:
    """The resolved settings in full, and beside them what they resolved to.

    ``model`` is the short name (legends, tables); ``model_path`` what was given. ``device`` and
    ``backend`` stay as set ("auto"); ``device_used`` and ``backend_used`` say what ran.
    """
    params: dict[str, Any] = {
        **settings.flat(),
        "model": short_name(settings.model.model),
        "model_path": settings.model.model,
        "num_labels": len(labels),
        "device_used": context.device,
        "backend_used": context.backend or "none (simulation)",
    }
    if context.silo_examples:
        params["train_examples"] = sum(context.silo_examples.values())
    if context.test_examples is not None:
        params["test_examples"] = context.test_examples
    if context.megabytes_per_round is not None:
        params["megabytes_per_silo_round"] = f"{context.megabytes_per_round:.3f}"
    # Constant for a run, so params, not a metric per round; under the silos' common prefix.
    params.update({f"{SILO_PREFIX}/{rank}/examples": n for rank, n in sorted(context.silo_examples.items())})
    return params


def content_digest(reference: str) -> str:
    """16 hex digits of the SHA-256 of a local data file (or of a directory's files, by relative
    name); of the name itself for a hub dataset, whose files are not ours to read here."""
    path = Path(reference).expanduser()
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        digest.update(reference.encode())
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class DataInput:
    """One dataset the run read, as MLflow's ``log_inputs`` records it."""

    name: str
    digest: str
    source_type: str  # "local" or "hugging_face", as MLflow's own dataset sources name them
    source: str  # JSON
    profile: str  # JSON: the rows used
    context: str  # "training" or "test", MLflow's mlflow.data.context tag


def data_inputs(settings: Settings, context: RunContext) -> list[DataInput]:
    """The training data (when this process knows it: not with private silo data) and the test data.

    A test set held out of the training data is the same source: one input, both sizes in its
    profile (MLflow records a dataset once per run)."""
    data = settings.data
    sizes: dict[str, dict[str, int]] = {}
    if data.partition != "none" and data.dataset:
        sizes[data.dataset] = {"training_examples": sum(context.silo_examples.values())}
    test_source = data.test_dataset or (data.dataset if data.partition != "none" else None)
    if test_source and context.test_examples is not None:
        sizes.setdefault(test_source, {})["test_examples"] = context.test_examples
    inputs = []
    for reference, profile in sizes.items():
        local = Path(reference).expanduser().exists()
        source = {"uri": Path(reference).expanduser().resolve().as_uri()} if local else {"path": reference}
        inputs.append(
            DataInput(
                name=short_name(reference),
                digest=content_digest(reference),
                source_type="local" if local else "hugging_face",
                source=json.dumps(source),
                profile=json.dumps(profile),
                context="training" if "training_examples" in profile else "test",
            )
        )
    return inputs
