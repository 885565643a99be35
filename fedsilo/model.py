"""Build the classifier and tokenizer; view the model's federated state as one flat vector.

The model knows nothing of federation: the round code calls :func:`bind_flat` once, after which
the model's tensors live inside one contiguous buffer that the wire and the averaging use as it
is. :func:`load_flat` copies a separate buffer into the model.

With LoRA (``--peft lora``, :func:`add_lora`) the model is a PEFT model whose pretrained weights
are frozen: only its trainable tensors, the adapters and the classification head, are the flat
vector; the frozen base is every rank's own copy, checked equal at join
(:func:`architecture_fingerprint`) and never sent.
"""

from __future__ import annotations

import hashlib
import typing
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from fedsilo import hub
from fedsilo.config import ModelConfig, Settings, fingerprint
from fedsilo.data import torch_seed
from fedsilo.errors import ConfigError, ModelError, first_line

# The layers that get LoRA adapters when --lora-target-modules is unset, by the model's
# ``model_type``: the attention's query and value projections, as in the LoRA paper (Hu et al.
# 2021, section 7.1: adapting W_q and W_v at rank 8 matched adapting more matrices at a lower
# rank). GPT-2 computes query, key and value in one Conv1D. Other families fall back to PEFT's own table.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
}


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, with a padding token: a decoder's (GPT-2, Llama...) often has none, and
    then pads with its end-of-sequence token, as Hugging Face's examples do for classification."""
    from transformers import AutoTokenizer

    options = hub.load_options(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **options)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise ModelError(f"cannot load tokenizer '{name}' {hub.why_not(name, options)}: {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of '{name}' has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_classifier(settings: Settings, labels: list[str], tokenizer: Any) -> torch.nn.Module:
    """The federation's model, as every rank and the simulation build it: :func:`build_model` told
    the tokenizer's padding token, gradient checkpointing if asked, LoRA adapters if asked."""
    model = build_model(settings.model.model, labels, settings.train.seed, pad_token_id=tokenizer.pad_token_id)
    if settings.train.gradient_checkpointing:
        # Non-reentrant: it needs no input that requires grad, which a frozen embedding (LoRA) is not.
        # transformers 5.x renamed the switch, and deprecated the old name.
        hf = typing.cast(Any, model)
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable({"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.model.peft == "lora":
        model = add_lora(model, settings.model)
    return model


def build_model(name: str, labels: list[str], seed: int, *, pad_token_id: int | None = None) -> torch.nn.Module:
    """Pretrained model with a classification head for ``labels``, seeded so every run starts alike.

    A checkpoint whose head has another label count (a classifier fine-tuned on another task)
    keeps its body and gets a fresh head of the right size. A decoder classifies from the last
    token that is not padding, which it finds by ``pad_token_id`` (the tokenizer's): a config
    without one is given it, else a batch of texts of different lengths cannot be classified.
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
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return typing.cast(torch.nn.Module, model)


def add_lora(model: torch.nn.Module, config: ModelConfig) -> torch.nn.Module:
    """``model`` as a PEFT model with LoRA adapters (``config``'s lora_* settings), all else frozen but
    the classification head (:func:`head_modules`), which trains whole.

    The adapters' A matrices are drawn from the global random state, B is zero: the model computes
    what it did until the first step. PEFT is imported here: it takes seconds to import.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
    from transformers.pytorch_utils import Conv1D

    family = getattr(model.config, "model_type", "")
    targets = config.lora_target_modules or LORA_TARGETS.get(family) or PEFT_TARGETS.get(family)
    if not targets:
        raise ConfigError(
            f"no default LoRA target modules for a '{family}' model: set lora_target_modules (--lora-target-modules)"
        )
    matched = {t: [m for n, m in model.named_modules() if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, modules in matched.items() if not modules]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
        )
        raise ConfigError(
            f"invalid setting 'lora_target_modules': the {family} model has no module named {', '.join(missing)} "
            f"(its linear layers: {', '.join(linear)})"
        )
    head = [n for n, m in head_modules(model).items() if any(True for _ in m.parameters())]
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        # DistilBERT's pre_classifier is as new as its classifier: PEFT's SEQ_CLS default would freeze it.
        modules_to_save=head,
        # GPT-2's Conv1D stores its weight transposed; saying so spares PEFT's warning.
        fan_in_fan_out=any(isinstance(m, Conv1D) for modules in matched.values() for m in modules),
    )
    with warnings.catch_warnings():
        # PEFT asks transformers 5 a question by its deprecated name; nothing for a user to do.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return typing.cast(torch.nn.Module, get_peft_model(model, lora))


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (:func:`add_lora`), told without importing PEFT."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT model (its adapters in place), or ``model`` itself."""
    return typing.cast(torch.nn.Module, typing.cast(Any, model).get_base_model()) if is_peft(model) else model


def head_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers a pretrained model does not bring: the model's children beside its base model
    (BERT: classifier; DistilBERT: pre_classifier and classifier; GPT-2, Llama: score), by name.
    In a PEFT model each is PEFT's wrapper holding the frozen original and the trained copy."""
    model = unwrapped(model)
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
    generator = torch.Generator().manual_seed(torch_seed(seed))
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    for name, head in head_modules(model).items():
        for layer in head.modules():
            if not any(p.requires_grad for p in layer.parameters(recurse=False)):
                continue  # no weights of its own, or PEFT's frozen original of a trained head
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.empty(layer.weight.shape).normal_(0.0, std, generator=generator))
                if layer.bias is not None:
                    layer.bias.zero_()
            elif isinstance(layer, torch.nn.LayerNorm):
                layer.reset_parameters()
            elif any(True for _ in layer.parameters(recurse=False)):
                raise ModelError(f"cannot draw a per-client head: {name} holds a {type(layer).__name__}")


def float_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's floating-point parameters and buffers, each once, in state-dict order; of a PEFT
    model, its trainable parameters only (adapters and head), in parameter order.

    Only floating-point tensors are averaged: integer buffers such as position ids are constant.
    """
    if is_peft(model):
        return [p for p in model.parameters() if p.requires_grad]
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
    """Hash of tensor names, shapes and dtypes: equal exactly when flat vectors line up. Of a PEFT
    model, also of its frozen weights' values (:func:`base_fingerprint`): the flat vectors then hold
    only the adapters and head, which mean the same only on the same base."""
    shapes = ";".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in model.state_dict().items())
    return fingerprint(f"{shapes};base:{base_fingerprint(model)}" if is_peft(model) else shapes)


@torch.no_grad()
def base_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the names and bytes of every tensor the flat vector leaves out (a PEFT model's frozen
    base and its buffers). About a second per 100M parameters on a CPU; done once, at join."""
    digest = hashlib.sha256()
    trained = {id(t) for t in float_tensors(model)}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in trained:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
