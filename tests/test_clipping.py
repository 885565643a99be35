"""The clipped sum of per-example gradients in one backward pass (fedsilo.clipping) against the
definition: one backward pass per example, each gradient clipped to C over every trainable weight,
summed. Every family and layer kind the rules cover: linear layers by ghost norm and by per-example
gradient, embeddings with padding, layer and RMS norms, GPT-2's Conv1D (torch.func), ALBERT's shared
layers (one module called per depth), LoRA adapters, and the [CLS]-only last layer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from fedsilo import dp
from fedsilo.clipping import ClippedSum
from fedsilo.config import build_settings
from fedsilo.data import collate
from fedsilo.last_layer import cls_only_last_layer
from fedsilo.model import build_classifier, load_tokenizer
from fedsilo.workload import silo_data
from tests.tiny import make_tiny_model

ROWS = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("bert", "distilbert", "albert", "gpt2", "llama")}


def classifier_and_batch(
    path: Path, csv: Path, peft: str, attention_mask: bool
) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    settings = build_settings(
        {"model": str(path), "dataset": str(csv), "silos": 1, "peft": peft, "seed": 2, "max_length": 24}
    )
    tokenizer = load_tokenizer(str(path))
    data = silo_data(settings, 1, tokenizer)
    model = build_classifier(settings, data.labels, tokenizer)
    with torch.no_grad():  # LoRA's B starts at zero, and then A gets no gradient: make both matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()  # no dropout: the batch and the one-example passes must compute the same thing
    batch = collate(data.train, list(range(ROWS)), attention_mask)
    labels = batch.pop("labels")
    return model, batch, labels


def by_hand(model: torch.nn.Module, batch: dict, labels: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each example's gradient of every trainable tensor, from a backward pass of that example alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(ROWS):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = torch.nn.functional.cross_entropy(model(**one).logits.float(), labels[i : i + 1], reduction="sum")
        found = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)])
    return grads


@pytest.mark.parametrize(
    ("arch", "peft", "attention_mask", "cls_only"),
    [
        ("bert", "none", True, False),  # short rows: every linear layer by its ghost norm
        ("bert", "none", False, False),  # padded to 24: the wide ones by per-example gradient; padding_idx
        ("bert", "none", True, True),  # the [CLS]-only last layer
        ("bert", "lora", True, False),  # adapters (per-example) and the head, the base frozen
        ("distilbert", "none", True, True),
        ("albert", "none", True, False),  # one layer module called at every depth
        ("gpt2", "none", True, False),  # Conv1D: torch.func
        ("llama", "lora", True, False),  # RMS norms frozen, adapters on q and v, the score head
        ("llama", "none", True, False),
    ],
)
def test_the_clipped_sum_is_each_examples_gradient_clipped_and_summed(
    arch: str, peft: str, attention_mask: bool, cls_only: bool, tiny: dict[str, Path], sentiment_csv: Path
) -> None:
    # Prepare: each example's gradient the slow way, and a C that clips some examples and not others
    model, batch, labels = classifier_and_batch(tiny[arch], sentiment_csv, peft, attention_mask)
    grads = by_hand(model, batch, labels)
    norms = torch.stack([torch.stack([g.norm() for g in example]).norm() for example in grads])
    limit = float(norms.median())
    factor = (limit / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any() and (factor == 1).any()
    expected = [sum(float(factor[i]) * grads[i][j] for i in range(ROWS)) for j in range(len(grads[0]))]
    # Execute: one forward and one backward pass over the batch
    clipped_sum = ClippedSum(model)
    with cls_only_last_layer(model) if cls_only else contextlib.nullcontext() as applied:
        assert applied is not False or not cls_only  # the [CLS]-only case must really run it
        batch = {**batch, **dp._per_example_ids(model, batch["input_ids"])}
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels, reduction="sum")
        got = clipped_sum(loss, ROWS, limit)
    clipped_sum.close()
    # Assert: the same tensor for every trainable parameter, and no weight gradient left behind
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, mine, theirs in zip(names, got, expected, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), name
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not hasattr(m, "ft_compute_sample_grad") for m in model.modules())


def test_a_tensor_shared_by_the_batch_is_refused_not_taken_for_an_example(
    tiny: dict[str, Path], sentiment_csv: Path
) -> None:
    # BERT's own position ids are one (1, length) row for the whole batch: its position embeddings'
    # gradient would be the batch's, and clipping it per example would be wrong
    model, batch, labels = classifier_and_batch(tiny["bert"], sentiment_csv, "none", True)
    clipped_sum = ClippedSum(model)
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels, reduction="sum")
    with pytest.raises(RuntimeError, match=r"Embedding saw a tensor of shape \(1, .*per-example gradients need"):
        clipped_sum(loss, ROWS, 1.0)
    clipped_sum.close()


def test_layers_recomputed_in_the_backward_pass_are_refused(tiny: dict[str, Path], sentiment_csv: Path) -> None:
    # gradient checkpointing reruns each layer inside the backward pass: the inputs the clipping
    # kept would not be the ones the gradients flow through (DP-SGD refuses the setting at start-up)
    model, batch, labels = classifier_and_batch(tiny["bert"], sentiment_csv, "none", True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers checkpoints in training mode only
    clipped_sum = ClippedSum(model)
    batch = {**batch, **dp._per_example_ids(model, batch["input_ids"])}
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels, reduction="sum")
    with pytest.raises(RuntimeError, match="recomputed in the backward pass"):
        clipped_sum(loss, ROWS, 1.0)
    clipped_sum.close()
