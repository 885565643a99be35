"""Build the classifier and tokenizer; view the model's floating-point state as one flat vector.

The model knows nothing of federation: the round code only calls :func:`flatten_into` and
:func:`load_flat` to move the whole model through one contiguous buffer.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from fedsilo.errors import ModelError


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise ModelError(
            f"cannot load tokenizer '{name}' (not a local directory and not reachable on the hub): "
            f"{_first_line(exc)}"
        ) from None


def build_model(name: str, labels: list[str], seed: int) -> torch.nn.Module:
    """Pretrained encoder with a fresh classification head, seeded so every run starts alike."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The "newly initialized classifier" warning and the loading bars are expected in every
    # run on every rank; keep the output readable.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    except Exception as exc:
        raise ModelError(
            f"cannot load model '{name}' (not a local directory and not reachable on the hub): "
            f"{_first_line(exc)}"
        ) from None
    return model


def float_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's floating-point parameters and buffers, each once, in state-dict order.

    Only floating-point tensors are averaged: integer buffers such as position ids are constant.
    """
    seen: set[int] = set()
    out = []
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(tensor)
    return out


def flat_size(model: torch.nn.Module) -> int:
    return sum(t.numel() for t in float_tensors(model))


@torch.no_grad()
def flatten_into(model: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Copy the model's state into ``out`` (fp32, flat) without allocating another full copy."""
    offset = 0
    for tensor in float_tensors(model):
        n = tensor.numel()
        out[offset : offset + n].copy_(tensor.detach().reshape(-1))
        offset += n
    return out


def flatten(model: torch.nn.Module) -> torch.Tensor:
    device = next(model.parameters()).device
    return flatten_into(model, torch.empty(flat_size(model), dtype=torch.float32, device=device))


@torch.no_grad()
def load_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector back into the model's tensors, in place."""
    offset = 0
    for tensor in float_tensors(model):
        n = tensor.numel()
        tensor.copy_(flat[offset : offset + n].view_as(tensor))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the model {offset}")


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """Hash of tensor names, shapes and dtypes: equal exactly when flat vectors line up."""
    spec = ";".join(
        f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items()
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]
