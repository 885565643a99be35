"""Atomic per-round checkpoints of the aggregator's state, and resume.

Silos keep no state between rounds (their optimiser starts afresh each round, its learning
rate schedule is placed by the round number, and each round's data order and dropout are seeded
by (seed, rank, round)), so the global weights, the server optimiser's state (none for FedAvg),
the round and the MLflow run id are all it takes to continue a federation exactly where it
stopped. A FedAvg checkpoint is the file it always was.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsilo.errors import ConfigError


@dataclass(frozen=True)
class Checkpoint:
    round: int
    weights: torch.Tensor
    run_id: str | None
    labels: list[str]
    fingerprint: str
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)  # see fedsilo.server_opt


def checkpoint_path(directory: Path, fingerprint: str) -> Path:
    """One file per settings fingerprint: changed settings never resume someone else's run."""
    return directory / fingerprint / "latest.pt"


def ensure_writable(directory: Path) -> None:
    """Fail before round 1, not after an hour of training."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"checkpoint directory {directory} is not writable: {exc.strerror}") from None


def save(directory: Path, state: Checkpoint) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over the old one."""
    path = checkpoint_path(directory, state.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            raw = {
                "round": state.round,
                "weights": state.weights.detach().cpu(),
                "run_id": state.run_id,
                "labels": state.labels,
                "fingerprint": state.fingerprint,
            }
            if state.server_state:  # absent for FedAvg: the file stays what older versions read and wrote
                raw["server_state"] = {k: v.detach().cpu() for k, v in state.server_state.items()}
            torch.save(raw, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(directory: Path, fingerprint: str) -> Checkpoint | None:
    path = checkpoint_path(directory, fingerprint)
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = Checkpoint(
            int(raw["round"]),
            raw["weights"],
            raw["run_id"],
            list(raw["labels"]),
            raw["fingerprint"],
            dict(raw.get("server_state", {})),
        )
    except Exception as exc:
        raise ConfigError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); move it away to start over"
        ) from None
    tensors = [state.weights, *state.server_state.values()]
    if not all(isinstance(t, torch.Tensor) for t in tensors) or state.fingerprint != fingerprint or state.round < 1:
        raise ConfigError(f"checkpoint {path} is not one this federation wrote; move it away to start over")
    return state


def check_fits(state: Checkpoint, directory: Path, labels: list[str], size: int, *, lora: bool = False) -> None:
    """The checkpoint belongs to this model and label set (the files behind --model may have changed).
    ``lora``: this federation trains LoRA adapters, ``size`` their and the head's values only."""
    path = checkpoint_path(directory, state.fingerprint)
    if lora and state.weights.numel() > size:
        raise ConfigError(
            f"checkpoint {path} holds {state.weights.numel()} weights, more than the {size} LoRA adapter and head "
            "weights this federation trains (--peft lora): it was written by a full fine-tuning run; move it away "
            "to start over"
        )
    if state.labels != labels:
        raise ConfigError(
            f"checkpoint {path} was written for labels [{', '.join(state.labels)}], this federation "
            f"has [{', '.join(labels)}]; move it away to start over"
        )
    for name, tensor in {"weights": state.weights, **state.server_state}.items():
        if tensor.numel() != size:
            raise ConfigError(
                f"checkpoint {path} holds {tensor.numel()} {'weights' if name == 'weights' else 'values of ' + name}, "
                f"the model has {size}; move it away to start over"
            )
