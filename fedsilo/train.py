"""Local training and evaluation in plain PyTorch. Nothing here knows about federation."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from fedsilo.data import Encoded, iterate_batches, torch_seed
from fedsilo.last_layer import cls_only_last_layer
from fedsilo.rows import WireRow


@dataclass(frozen=True)
class TrainResult:
    examples: int
    mean_loss: float
    seconds: float
    steps: int  # optimiser steps taken: the round's length on the step axis of `fedsilo report`
    # Per embedding table trained with sparse gradients: (its weight, the sorted rows its
    # gradients reached). Every other row of that table was left exactly as it was.
    changed_rows: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()


@dataclass(frozen=True)
class EvalResult(WireRow):
    """Scores over a test set, as sums: silos' results add up to the federation's (one row each)."""

    examples: int
    loss_sum: float
    correct: int

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> EvalResult:
        """The federation's scores: the silos' rows added up (rank 0's placeholder skipped)."""
        return cls.from_row(rows[1:].sum(0).tolist())

    @classmethod
    def per_rank(cls, rows: torch.Tensor) -> dict[int, EvalResult]:
        """Each silo's own scores, by rank (rank 0's placeholder skipped)."""
        return {rank: cls.from_row(row) for rank, row in enumerate(rows.tolist()) if rank}

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.examples if self.examples else float("nan")


@dataclass(frozen=True)
class Schedule:
    """The learning rate's course over ``parts`` equal calls of :func:`local_train` (a federation's
    rounds), of which a call is number ``part`` (from 0): it continues where the previous part
    ended, so a replayed part (a resumed round) gets the same rates.

    Over the ``total`` steps of all parts, as Hugging Face's schedulers: the rate rises linearly
    from 0 over the first ``ceil(warmup_ratio * total)`` steps, then stays constant or decays
    linearly or along a half cosine to 0 at the last step.
    """

    kind: str = "constant"
    warmup_ratio: float = 0.0
    parts: int = 1
    part: int = 0

    def factor(self, step: int, total: int) -> float:
        """The multiple of the base learning rate at ``step`` (from 0) of ``total``."""
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        if self.kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        raise ValueError(f"unknown learning-rate schedule {self.kind!r}")


CONSTANT_RATE = Schedule()


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        from fedsilo.errors import ConfigError

        raise ConfigError("device 'cuda' was asked for, but no GPU is visible to this process")
    return torch.device(choice)


# Call progress() every this many batches (and after the last): reading the running loss
# waits for the GPU, which would otherwise run ahead of Python.
PROGRESS_EVERY = 20


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    # bf16 autocast on GPU: fp32 master weights, so averaging stays exact in fp32. What stays in
    # fp32 there may use TF32 matmuls (10-bit mantissa inputs, fp32 accumulation).
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def sparse_embedding_grads(model: torch.nn.Module) -> Iterator[dict[torch.Tensor, torch.Tensor]]:
    """Embedding gradients as sparse rows while training, dense again afterwards.

    Plain SGD (no momentum, no weight decay) leaves the rows a batch did not use exactly as they
    were, so a dense gradient of the whole table (MiniLM's vocabulary: 30522 x 384, half the
    model) is allocated, zero-filled and stepped over for nothing every batch. A sparse one holds
    the batch's tokens only; the rows it touches get the same update. It is coalesced (repeated
    tokens summed in index order) so that the update does not depend on the thread count, as
    the simulation and the distributed silos must agree.

    Yields a mapping that, once the block ends, holds each table's weight and the sorted rows
    its gradients reached (tables that ever got a dense gradient, a tied weight, are left out).
    """
    dense = [
        m for m in model.modules() if isinstance(m, torch.nn.Embedding) and not m.sparse and m.weight.requires_grad
    ]
    # One flag per row, set as gradients arrive (bounded, and no host sync per batch); None once
    # a table got a dense gradient, after which any of its rows may change.
    reached: dict[torch.nn.Embedding, torch.Tensor | None] = {
        m: torch.zeros(m.num_embeddings, dtype=torch.bool, device=m.weight.device) for m in dense
    }

    def hook(module: torch.nn.Embedding) -> Callable[[torch.Tensor], torch.Tensor]:
        def coalesce(grad: torch.Tensor) -> torch.Tensor:
            if not grad.is_sparse:
                reached[module] = None
                return grad
            grad = grad.coalesce()
            rows = reached[module]
            if rows is not None:
                rows[grad.indices()[0]] = True
            return grad

        return coalesce

    hooks = [m.weight.register_hook(hook(m)) for m in dense]  # type: ignore[no-untyped-call]
    for module in dense:
        module.sparse = True
    changed: dict[torch.Tensor, torch.Tensor] = {}
    try:
        yield changed
    finally:
        for module, handle in zip(dense, hooks, strict=False):
            module.sparse = False
            handle.remove()
    changed.update((m.weight, rows.nonzero().squeeze(1)) for m, rows in reached.items() if rows is not None)


def make_optimizer(
    params: list[torch.nn.Parameter], optimizer: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """A new local optimiser: plain SGD (weight decay as an L2 term) or AdamW (decoupled decay)."""
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown local optimiser {optimizer!r}")


def local_train(
    model: torch.nn.Module,
    data: Encoded,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: Sequence[int],
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    schedule: Schedule = CONSTANT_RATE,
    fedprox_mu: float = 0.0,
    attention_mask: bool = True,
    group_by_length: bool = False,
    fast_paths: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """``epochs`` passes of ``optimizer``: plain SGD by default (no momentum, no weight decay: the
    paper's setup), or AdamW; ``weight_decay`` is decoupled for AdamW and an L2 term for SGD.

    The optimiser is new on every call: AdamW's moments start at zero each time. ``lr`` follows
    ``schedule``. ``fedprox_mu`` adds FedProx's ``mu/2 ||w - w_start||^2`` to the loss, ``w_start``
    the weights the call began with; 0 leaves the computation as it is.

    ``seed`` fixes dropout and data order, so a round can be replayed exactly after a restart.
    With ``fast_paths`` a BERT or DistilBERT classifier's last layer computes only the position its
    head reads (:mod:`fedsilo.last_layer`), and under plain SGD embedding tables get sparse
    gradients: the same update, less work (dropout draws other masks, so not the same bits).
    ``progress(done_batches, total_batches, loss)`` is called now and then for display, and
    after the last batch. The parameters are stepped in place (a flat binding stays valid).
    """
    device = next(model.parameters()).device
    torch.manual_seed(torch_seed(seed))
    # the trainable ones: with LoRA the frozen base gets no gradient, FedProx anchor or optimiser state
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr, weight_decay)
    total_batches = epochs * -(-len(data) // batch_size)
    first = schedule.part * total_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: schedule.factor(first + i, schedule.parts * total_batches)
    )
    # FedProx's gradient mu (w - w_start), added after backward: one copy of the model, only when asked
    anchor = [p.detach().clone() for p in params] if fedprox_mu > 0 else []
    # Sparse gradients leave unused rows as they were only under plain SGD: weight decay, AdamW's
    # moments and the proximal pull move every row.
    sparse = fast_paths and optimizer == "sgd" and weight_decay == 0 and fedprox_mu == 0
    model.train()
    started = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync per batch
    seen, done = 0, 0
    changed: dict[torch.Tensor, torch.Tensor] = {}
    with contextlib.ExitStack() as speedups:
        if sparse:
            changed = speedups.enter_context(sparse_embedding_grads(model))  # filled as the block ends
        if fast_paths:
            speedups.enter_context(cls_only_last_layer(model))
        for epoch in range(epochs):
            for batch in iterate_batches(
                data,
                batch_size,
                (*seed, epoch),
                shuffle=True,
                group_by_length=group_by_length,
                attention_mask=attention_mask,
            ):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                # forward backward update
                with _autocast(device):
                    loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if fedprox_mu > 0:
                    for p, start in zip(params, anchor, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p.detach() - start, alpha=fedprox_mu)
                opt.step()
                scheduler.step()
                n = len(batch["labels"])
                loss_sum += loss.detach() * n
                seen += n
                done += 1
                if progress is not None and (done % PROGRESS_EVERY == 0 or done == total_batches):
                    progress(done, total_batches, float(loss_sum) / seen)
    return TrainResult(
        seen // epochs, float(loss_sum) / max(seen, 1), time.perf_counter() - started, done, tuple(changed.items())
    )


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, data: Encoded, *, batch_size: int, attention_mask: bool = True, fast_paths: bool = True
) -> EvalResult:
    """Loss and accuracy over ``data``, in length-sorted batches (least padding); ``fast_paths`` as
    in :func:`local_train`."""
    device = next(model.parameters()).device
    model.eval()
    loss_sum, correct = 0.0, 0
    with cls_only_last_layer(model) if fast_paths else contextlib.nullcontext():
        for batch in iterate_batches(
            data, batch_size, (0,), shuffle=False, group_by_length=True, attention_mask=attention_mask
        ):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with _autocast(device):
                out = model(**batch)
            n = len(batch["labels"])
            loss_sum += out.loss.float().item() * n
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return EvalResult(len(data), loss_sum, correct)
