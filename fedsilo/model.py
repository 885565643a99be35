"""Build the classifier and tokenizer; view the model's floating-point state as one flat vector.

The model knows nothing of federation: the round code calls :func:`bind_flat` once, after which
the model's tensors live inside one contiguous buffer that the wire and the averaging use as it
is. :func:`load_flat` copies a separate buffer into the model.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsilo import hub
from fedsilo.config import fingerprint
from fedsilo.errors import ModelError, first_line


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    options = hub.load_options(name)
    try:
        return AutoTokenizer.from_pretrained(name, **options)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise ModelError(f"cannot load tokenizer '{name}' {hub.why_not(name, options)}: {first_line(exc)}") from None


def build_model(name: str, labels: list[str], seed: int) -> torch.nn.Module:
    """Pretrained encoder with a classification head for ``labels``, seeded so every run starts alike.

    A checkpoint whose head has another label count (a classifier fine-tuned on another task)
    keeps its encoder and gets a fresh head of the right size.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if len(labels) < 2:
        # transformers treats a 1-output head as regression: it would train without complaint.
        raise ModelError(f"a classifier needs at least two labels, got [{', '.join(labels)}]")
    # The "newly initialized classifier" warning and the loading bars are expected in every
    # run on every rank; keep the output readable.
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.manual_seed(seed)
    options = hub.load_options(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,
            **options,
        )
    except Exception as exc:
        raise ModelError(f"cannot load model '{name}' {hub.why_not(name, options)}: {first_line(exc)}") from None
    return typing.cast(torch.nn.Module, model)


def head_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers a pretrained encoder does not bring: the model's children beside its base model
    (BERT: classifier; DistilBERT: pre_classifier and classifier), by name."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ModelError(f"{type(model).__name__} has no pretrained base model to tell its head from")
    return {name: child for name, child in model.named_children() if child is not base}


@torch.no_grad()
def draw_head(model: torch.nn.Module, seed: Sequence[int]) -> None:
    """Initialise the head (:func:`head_modules`) afresh from ``seed``, as transformers initialises a
    new head: linear weights from N(0, initializer_range), biases 0; the body is left as it is.

    Drawn on the CPU from its own generator, so a silo on a GPU and a simulated client on the CPU
    with the same seed get the same head, and the global random state is untouched.
    """
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0] >> 1)
    )
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    for name, head in head_modules(model).items():
        for layer in head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.empty(layer.weight.shape).normal_(0.0, std, generator=generator))
                if layer.bias is not None:
                    layer.bias.zero_()
            elif isinstance(layer, torch.nn.LayerNorm):
                layer.reset_parameters()
            elif any(True for _ in layer.parameters(recurse=False)):
                raise ModelError(f"cannot draw a per-client head: {name} holds a {type(layer).__name__}")


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
def load_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector back into the model's tensors, in place."""
    offset = 0
    for tensor in float_tensors(model):
        n = tensor.numel()
        tensor.copy_(flat[offset : offset + n].view_as(tensor))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the model {offset}")


@torch.no_grad()
def bind_flat(model: torch.nn.Module) -> torch.Tensor:
    """Move the model's floating-point tensors into one flat fp32 vector, each becoming a view of
    its slice (in :func:`float_tensors` order), and return the vector.

    From then on the vector *is* the model, with no second copy: the optimiser steps parameters
    in place, so training writes into it, and writing into it (a received global model, an
    average) changes the model. Tied tensors are one object in :func:`float_tensors`, so they
    stay tied; non-contiguous tensors become contiguous views. Call it after the model has
    reached its device: ``.to()`` allocates new tensors and would leave the vector behind.
    """
    tensors = float_tensors(model)
    wrong = sorted({str(t.dtype) for t in tensors if t.dtype != torch.float32})
    if wrong:
        raise ValueError(f"bind_flat needs float32 tensors, the model has {', '.join(wrong)}")
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32, device=tensors[0].device)
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        view = flat[offset : offset + n].view(tensor.shape)
        view.copy_(tensor)
        tensor.data = view  # the old storage is freed here, tensor by tensor
        offset += n
    return flat


def offset_in(flat: torch.Tensor, tensor: torch.Tensor) -> int:
    """Where ``tensor``, one of a bound model's tensors (see :func:`bind_flat`), starts in ``flat``."""
    offset, rest = divmod(tensor.data_ptr() - flat.data_ptr(), flat.element_size())
    if (
        rest
        or tensor.dtype != flat.dtype
        or not tensor.is_contiguous()
        or tensor.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
        or not 0 <= offset <= flat.numel() - tensor.numel()
    ):
        raise ValueError("the tensor is not a contiguous slice of the flat vector")
    return offset


def is_bound(model: torch.nn.Module, flat: torch.Tensor) -> bool:
    """Whether every floating-point tensor of ``model`` is its slice of ``flat`` (see :func:`bind_flat`)."""
    offset, base = 0, flat.data_ptr()
    for tensor in float_tensors(model):
        if (
            tensor.dtype != flat.dtype
            or not tensor.is_contiguous()
            or tensor.data_ptr() != base + offset * flat.element_size()
        ):
            return False
        offset += tensor.numel()
    return offset == flat.numel() and flat.is_contiguous()


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """Hash of tensor names, shapes and dtypes: equal exactly when flat vectors line up."""
    return fingerprint(";".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items()))
