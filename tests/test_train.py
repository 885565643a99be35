"""fedsilo.train: sparse embedding gradients give plain SGD's update and name the rows they changed;
progress after the last batch; the local optimisers, the learning-rate schedule and FedProx against
their plain definitions."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsilo.data import Encoded, encode, iterate_batches
from fedsilo.model import build_model, load_tokenizer
from fedsilo.train import Schedule, local_train, sparse_embedding_grads
from tests.reference import flatten
from tests.tiny import sentiment_rows


class BagOfWords(torch.nn.Module):
    """Mean of token embeddings, then a linear head: called like a transformers classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8, padding_idx=0)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        logits = self.head(self.embed(input_ids).mean(1))
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def sgd(model: torch.nn.Module, batches: list[torch.Tensor], sparse: bool) -> list[bool]:
    """A few plain SGD steps; returns, per step, whether the embedding's gradient was sparse."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    kinds = []
    with sparse_embedding_grads(model) if sparse else contextlib.nullcontext():
        for ids in batches:
            optimizer.zero_grad(set_to_none=True)
            model(ids, torch.tensor([0, 1, 1])).loss.backward()
            kinds.append(model.embed.weight.grad.is_sparse)
            optimizer.step()
    return kinds


def test_sparse_embedding_gradients_give_the_dense_update_and_are_undone() -> None:
    # Prepare: one model twice; batches that repeat tokens and use the padding row
    torch.manual_seed(0)
    dense, sparse = BagOfWords(), BagOfWords()
    sparse.load_state_dict(dense.state_dict())
    initial = dense.embed.weight.detach().clone()
    batches = [torch.tensor([[3, 3, 7, 0], [9, 3, 0, 0], [4, 5, 6, 7]]), torch.tensor([[1, 2, 2, 2]] * 3)]
    # Execute
    kinds_dense, kinds_sparse = sgd(dense, batches, sparse=False), sgd(sparse, batches, sparse=True)
    # Assert: the same model to rounding, unused rows untouched, and the module dense again after
    assert kinds_dense == [False, False] and kinds_sparse == [True, True]
    for a, b in zip(dense.parameters(), sparse.parameters(), strict=False):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    unused = [r for r in range(50) if r not in {0, 1, 2, 3, 4, 5, 6, 7, 9}]
    assert torch.equal(sparse.embed.weight[unused], initial[unused])
    assert not sparse.embed.sparse and not sparse.embed.weight._backward_hooks


def test_local_train_reports_progress_after_the_last_batch() -> None:
    # Prepare: 50 rows in batches of 2: 25 batches, more than one progress interval
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = Encoded(
        [rng.integers(1, 50, size=int(rng.integers(2, 6))).tolist() for _ in range(50)],
        rng.integers(0, 2, size=50),
        0,
        8,
    )
    calls: list[tuple[int, int]] = []
    # Execute
    result = local_train(
        BagOfWords(),
        data,
        epochs=1,
        batch_size=2,
        lr=0.1,
        seed=(0,),
        progress=lambda done, total, loss: calls.append((done, total)),
    )
    # Assert: now and then, and once at the end; the mean loss is a plain float
    assert calls[-1] == (25, 25) and 1 < len(calls) < 25
    assert result.examples == 50 and isinstance(result.mean_loss, float) and result.mean_loss > 0


class TiedBagOfWords(BagOfWords):
    """The head scores with the embedding table itself: a dense gradient reaches every row."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        logits = self.embed(input_ids).mean(1) @ self.embed.weight.T
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def rows_of(tokens: list[list[int]]) -> Encoded:
    return Encoded(tokens, np.array([i % 2 for i in range(len(tokens))]), 0, 8)


def test_local_train_names_the_embedding_rows_it_changed() -> None:
    # Prepare: rows that use 7 of the 50 tokens (and padding, row 0, as batches pad)
    torch.manual_seed(0)
    model = BagOfWords()
    initial = model.embed.weight.detach().clone()
    data = rows_of([[3, 3, 7], [9, 12], [4, 5, 6, 7], [12, 9, 9, 9, 3]])
    # Execute
    result = local_train(model, data, epochs=2, batch_size=2, lr=0.5, seed=(1,))
    # Assert: one table, its used rows sorted (padding's row gets a zero gradient: listed, unchanged),
    # and every other row exactly as it was
    ((table, rows),) = result.changed_rows
    assert table is model.embed.weight
    assert set(rows.tolist()) - {0} == {3, 4, 5, 6, 7, 9, 12} and rows.tolist() == sorted(rows.tolist())
    others = [r for r in range(50) if r not in rows.tolist()]
    assert torch.equal(model.embed.weight[others], initial[others])
    assert not torch.equal(model.embed.weight[[3, 9, 12]], initial[[3, 9, 12]])


def test_a_table_with_a_dense_gradient_is_not_reported() -> None:
    # A tied table can change in any row: claiming only the looked-up ones would lose updates.
    torch.manual_seed(0)
    model = TiedBagOfWords()
    initial = model.embed.weight.detach().clone()
    result = local_train(model, rows_of([[3, 4], [5, 6]]), epochs=1, batch_size=2, lr=0.5, seed=(1,))
    assert result.changed_rows == ()
    assert not torch.equal(model.embed.weight[20], initial[20])  # a row no token used did change


# -- the learning-rate schedule -----------------------------------------------------------------------
def test_schedule_factors_worked_by_hand() -> None:
    # 10 steps, warmup 0.2: steps 0 and 1 rise from 0; decay over the 8 after (progress (s - 2) / 8)
    steps = [0, 1, 2, 4, 6, 9]
    factors = {kind: [Schedule(kind, 0.2).factor(s, 10) for s in steps] for kind in ("constant", "linear", "cosine")}
    assert factors["constant"] == pytest.approx([0, 0.5, 1, 1, 1, 1])
    assert factors["linear"] == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.125])
    cos = [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.875)]
    assert factors["cosine"] == pytest.approx([0, 0.5, *cos])
    # no warmup: the first step runs at the full rate
    assert Schedule("linear").factor(0, 10) == 1.0


def eight_rows() -> Encoded:
    return rows_of([[3, 3, 7], [9, 12], [4, 5, 6, 7], [12, 9, 9, 9, 3], [8, 2], [11, 4, 4], [6, 1], [10, 13, 2]])


def reference_train(
    model: torch.nn.Module,
    data: Encoded,
    optimizer: Callable[..., torch.optim.Optimizer],
    *,
    lr: float,
    rates: list[float],
    mu: float,
    seed: tuple[int, ...],
) -> None:
    """local_train written plainly, one epoch in batches of 2: the proximal term inside the loss
    (autograd differentiates it), each step's rate set by hand, dense gradients."""
    start = [p.detach().clone() for p in model.parameters()]
    opt = optimizer(model.parameters())
    for step, batch in enumerate(
        iterate_batches(data, 2, (*seed, 0), shuffle=True, group_by_length=False, attention_mask=True)
    ):
        loss = model(**batch).loss
        loss = loss + mu / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True))
        for group in opt.param_groups:
            group["lr"] = lr * rates[step]
        opt.zero_grad()
        loss.backward()
        opt.step()


LOCAL_CASES = {
    "sgd-weight-decay-linear": ("sgd", 0.5, 0.1, Schedule("linear", 0.25, parts=3, part=1), 0.0),
    "adamw-cosine": ("adamw", 0.05, 0.01, Schedule("cosine", 0.1, parts=3, part=2), 0.0),
    "sgd-fedprox": ("sgd", 0.5, 0.0, Schedule(), 2.0),
    "adamw-fedprox-warmup": ("adamw", 0.05, 0.0, Schedule("constant", 0.5, parts=2, part=0), 2.0),
}


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_local_train_steps_as_the_plain_definition(case: str) -> None:
    # Prepare: one model three times; 8 rows in batches of 2 are 4 steps of a schedule over parts x 4
    name, lr, decay, schedule, mu = LOCAL_CASES[case]
    torch.manual_seed(0)
    got, expected, plain = BagOfWords(), BagOfWords(), BagOfWords()
    expected.load_state_dict(got.state_dict())
    plain.load_state_dict(got.state_dict())
    make = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    rates = [schedule.factor(schedule.part * 4 + i, schedule.parts * 4) for i in range(4)]
    # Execute
    local_train(
        got,
        eight_rows(),
        epochs=1,
        batch_size=2,
        lr=lr,
        seed=(5,),
        optimizer=name,
        weight_decay=decay,
        schedule=schedule,
        fedprox_mu=mu,
    )
    reference_train(
        expected, eight_rows(), lambda p: make(p, lr=lr, weight_decay=decay), lr=lr, rates=rates, mu=mu, seed=(5,)
    )
    local_train(plain, eight_rows(), epochs=1, batch_size=2, lr=lr, seed=(5,))
    # Assert: the definition's model, and not what plain SGD at a constant rate gives
    for a, b in zip(got.parameters(), expected.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.head.weight, plain.head.weight, rtol=1e-4, atol=1e-5)


def test_fedprox_pulls_towards_the_starting_weights() -> None:
    torch.manual_seed(0)
    models = [BagOfWords() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    start = torch.cat([p.detach().flatten().clone() for p in models[0].parameters()])
    distances = []
    for model, mu in zip(models, (0.0, 0.5, 1.5), strict=True):
        local_train(model, eight_rows(), epochs=3, batch_size=2, lr=0.5, seed=(5,), fedprox_mu=mu)
        distances.append(float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm()))
    assert distances[0] > distances[1] > distances[2] > 0


def test_fedprox_mu_0_and_the_other_defaults_passed_explicitly_give_fedavgs_bits(tiny_bert: Path) -> None:
    # Prepare: a real (tiny) transformer with dropout, and the options a silo passes with default
    # settings in round 2 of 3
    tokenizer = load_tokenizer(str(tiny_bert))
    rows = sentiment_rows(40)
    data = encode(
        [r["text"] for r in rows], np.array([r["label"] == "pos" for r in rows], dtype=np.int64), tokenizer, 32
    )
    models = [build_model(str(tiny_bert), ["neg", "pos"], 3) for _ in range(2)]
    # Execute
    local_train(models[0], data, epochs=2, batch_size=8, lr=0.3, seed=(3, 1, 2))
    local_train(
        models[1],
        data,
        epochs=2,
        batch_size=8,
        lr=0.3,
        seed=(3, 1, 2),
        optimizer="sgd",
        weight_decay=0.0,
        schedule=Schedule("constant", 0.0, parts=3, part=1),
        fedprox_mu=0.0,
    )
    # Assert: the same bits, sparse embedding gradients and all
    assert torch.equal(flatten(models[0]), flatten(models[1]))
    assert not torch.equal(flatten(models[0]), flatten(build_model(str(tiny_bert), ["neg", "pos"], 3)))
