"""fedsilo.last_layer: a BERT or DistilBERT classifier's last layer computed at [CLS] only gives the
full model's loss, logits and gradients; other models are left alone; local_train and evaluate use it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

import fedsilo.train
from fedsilo.data import Encoded
from fedsilo.last_layer import cls_only_last_layer
from fedsilo.train import evaluate, local_train


def bert(attention: str = "sdpa", dropout: float = 0.0, **overrides: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=3,
        **overrides,
    )
    config._attn_implementation = attention
    return BertForSequenceClassification(config)


def distilbert(attention: str = "sdpa") -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=60,
        dim=32,
        n_layers=3,
        n_heads=4,
        hidden_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        num_labels=3,
    )
    config._attn_implementation = attention
    return DistilBertForSequenceClassification(config)


def padded_batch() -> dict[str, torch.Tensor]:
    """Rows of different lengths: the padding must stay hidden from the [CLS] query."""
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:], mask[3, 2:] = 0, 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1, 0])}


def loss_logits_grads(
    model: torch.nn.Module, cls_only: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    with cls_only_last_layer(model) if cls_only else contextlib.nullcontext():
        out = model(**padded_batch())
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@contextlib.contextmanager
def rows_seen_by_last_feed_forward(model: torch.nn.Module) -> Iterator[list[int]]:
    """The sequence length of every input the last layer's feed-forward block gets."""
    seen: list[int] = []
    first = (
        model.bert.encoder.layer[-1].intermediate.dense
        if isinstance(model, BertForSequenceClassification)
        else model.distilbert.transformer.layer[-1].ffn.lin1
    )
    handle = first.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", [bert, distilbert])
def test_cls_only_gives_the_full_models_loss_logits_and_gradients(
    arch: Callable[[str], torch.nn.Module], attention: str
) -> None:
    # Prepare: one model, no dropout (its masks are the one thing allowed to differ)
    model = arch(attention)
    # Execute: the full forward and backward, then the same batch with the last layer at [CLS] only
    full_loss, full_logits, full_grads = loss_logits_grads(model, cls_only=False)
    with rows_seen_by_last_feed_forward(model) as seen:
        loss, logits, grads = loss_logits_grads(model, cls_only=True)
    # Assert: the pruned layer ran on one position, and nothing a step uses changed
    assert seen == [1]
    assert torch.allclose(loss, full_loss, atol=1e-6) and torch.allclose(logits, full_logits, atol=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name


def test_the_full_layer_is_back_after_the_block() -> None:
    model = bert()
    with cls_only_last_layer(model) as applied:
        assert applied
    with rows_seen_by_last_feed_forward(model) as seen:
        model(**padded_batch())
    assert seen == [9] and "forward" not in vars(model.bert.encoder.layer[-1])


def test_models_it_does_not_know_are_left_alone() -> None:
    # A chunked feed-forward takes a path the [CLS] layer does not reproduce; ALBERT's layers share one module
    chunked = bert(chunk_size_feed_forward=3)
    albert = AlbertForSequenceClassification(
        AlbertConfig(
            vocab_size=60,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    for model in (chunked, albert):
        with cls_only_last_layer(model) as applied:
            assert not applied
    with cls_only_last_layer(chunked), rows_seen_by_last_feed_forward(chunked) as seen:
        chunked(**padded_batch())
    assert seen == [3, 3, 3]  # the full layer's nine positions, in chunks


def test_local_train_and_evaluate_run_the_last_layer_at_cls_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: two copies of one model and a few padded rows
    rng = np.random.default_rng(0)
    data = Encoded(
        [rng.integers(1, 60, size=n).tolist() for n in (3, 7, 5, 9, 4, 6)], np.array([0, 1, 2, 0, 1, 2]), 0, 16
    )
    pruned, full = bert(), bert()
    # Execute: local_train and evaluate as they are, and with the [CLS] layer turned off
    with rows_seen_by_last_feed_forward(pruned) as seen:
        local_train(pruned, data, epochs=2, batch_size=4, lr=0.1, seed=(0, 1, 1))
        pruned_eval = evaluate(pruned, data, batch_size=4)
    monkeypatch.setattr(fedsilo.train, "cls_only_last_layer", lambda _model: contextlib.nullcontext(False))
    local_train(full, data, epochs=2, batch_size=4, lr=0.1, seed=(0, 1, 1))
    full_eval = evaluate(full, data, batch_size=4)
    # Assert: every batch, training and evaluation, saw one position in the last layer; same model, same scores
    assert seen == [1] * 6
    for a, b in zip(pruned.parameters(), full.parameters(), strict=False):
        assert torch.allclose(a, b, atol=1e-6)
    assert pruned_eval.correct == full_eval.correct
    assert pruned_eval.loss_sum == pytest.approx(full_eval.loss_sum, rel=1e-5)


@pytest.mark.parametrize("arch", [bert, distilbert])
def test_with_fast_paths_off_every_position_is_computed_and_gradients_are_dense(
    arch: Callable[[], torch.nn.Module],
) -> None:
    # Prepare: two copies of one model and a few padded rows
    rng = np.random.default_rng(0)
    data = Encoded(
        [rng.integers(1, 60, size=n).tolist() for n in (3, 7, 5, 9, 4, 6)], np.array([0, 1, 2, 0, 1, 2]), 0, 16
    )
    fast, plain = arch(), arch()
    # Execute: the same training and evaluation with the switch on and off
    with rows_seen_by_last_feed_forward(fast) as seen_fast:
        fast_result = local_train(fast, data, epochs=2, batch_size=4, lr=0.1, seed=(0, 1, 1), fast_paths=True)
        fast_eval = evaluate(fast, data, batch_size=4, fast_paths=True)
    with rows_seen_by_last_feed_forward(plain) as seen_plain:
        plain_result = local_train(plain, data, epochs=2, batch_size=4, lr=0.1, seed=(0, 1, 1), fast_paths=False)
        plain_eval = evaluate(plain, data, batch_size=4, fast_paths=False)
    # Assert: off, the last layer sees every position and no table reports sparse rows; the same
    # model and scores either way (no dropout here, so the same random stream too)
    assert seen_fast == [1] * 6 and all(n > 1 for n in seen_plain) and len(seen_plain) == 6
    assert fast_result.changed_rows and plain_result.changed_rows == ()
    for a, b in zip(fast.parameters(), plain.parameters(), strict=False):
        assert torch.allclose(a, b, atol=1e-6)
    assert fast_eval.correct == plain_eval.correct
    assert fast_eval.loss_sum == pytest.approx(plain_eval.loss_sum, rel=1e-5)
