"""fedsilo.train: sparse embedding gradients give plain SGD's update and name the rows they changed;
progress after the last batch."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch

from fedsilo.data import Encoded
from fedsilo.train import local_train, sparse_embedding_grads


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
