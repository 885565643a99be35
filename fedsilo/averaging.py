"""Federated Averaging as pure functions, shared by the distributed roles and the simulation.

Weights are example counts (``len(dataset)``), never batch counts. The wire carries
``n_k * (theta_k - theta_global)``: summing those over silos (a reduce, or a running sum in the
simulation) and dividing by ``sum n_k`` gives the FedAvg step. Deltas keep precision when the
sum is carried in a narrow dtype.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsilo.rows import WireRow

WIDEN_SLICE = 1 << 20  # values per slice when widening a narrow sum: 4 MiB of fp32


class UpdateRejected(ValueError):
    """An update failed validation; the message names the silo and round."""


@dataclass(frozen=True)
class Rows:
    """Rows ``index`` of a ``shape`` table (an embedding) that starts at ``offset`` in a flat vector."""

    offset: int
    shape: tuple[int, int]
    index: torch.Tensor


def take_update(
    summed: torch.Tensor, local: torch.Tensor, reference: torch.Tensor, examples: int, rows: Sequence[Rows] = ()
) -> float:
    """``summed += examples * (local - reference)``, then ``local`` is ``reference`` again; returns
    the norm of ``local - reference``.

    Inside each table of ``rows`` only the listed rows are visited: everywhere else in it
    ``local`` must already equal ``reference`` (a table trained with sparse gradients), so the
    update there is exactly zero. The rest takes four in-place passes (difference, norm, sum,
    restore) and no model-sized temporary.
    """
    squares, start = 0.0, 0
    tables = sorted(rows, key=lambda t: t.offset)
    for table in [*tables, None]:
        stop = table.offset if table is not None else local.numel()
        if stop > start:
            update = local[start:stop].sub_(reference[start:stop])
            squares += float(update.norm()) ** 2
            summed[start:stop].add_(update, alpha=examples)
            local[start:stop].copy_(reference[start:stop])
        if table is not None:
            end = table.offset + table.shape[0] * table.shape[1]
            mine, theirs, total = (v[table.offset : end].view(table.shape) for v in (local, reference, summed))
            before = theirs.index_select(0, table.index)
            update = mine.index_select(0, table.index).sub_(before)
            squares += float(update.norm()) ** 2
            total.index_add_(0, table.index, update, alpha=examples)
            mine.index_copy_(0, table.index, before)
            start = end
    return math.sqrt(squares)


def finish_average(
    reference: torch.Tensor, summed: torch.Tensor, total_examples: int, scale: float = 1.0
) -> torch.Tensor:
    """The new global model: ``reference + scale * summed / total_examples``, in place on
    ``reference``; ``scale`` is a server learning rate (1: FedAvg)."""
    if total_examples <= 0:
        raise ValueError("no examples were contributed this round")
    if summed.dtype == reference.dtype:
        return reference.add_(summed, alpha=scale / total_examples)
    # A narrow wire dtype (bf16): widen slice by slice, so no model-sized fp32 temporary.
    for start in range(0, summed.numel(), WIDEN_SLICE):
        part = slice(start, start + WIDEN_SLICE)
        reference[part].add_(summed[part].to(reference.dtype), alpha=scale / total_examples)
    return reference


@dataclass(frozen=True)
class Report(WireRow):
    """What a silo says about its update, before the update itself travels (one row each)."""

    rank: int
    examples: int
    train_loss: float
    update_norm: float
    train_seconds: float = 0.0  # the silo's local training this round (MLflow's silo/<rank>/train_seconds)
    steps: int = 0  # its optimiser steps this round: the slowest silo's are the round's sequential steps
    sits_out: int = 0  # 1: its privacy budget is spent (--dp-on-exhausted skip); it sent nothing

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> list[Report]:
        """The silos' reports from the all-gathered rows, one per rank, rank 0's skipped."""
        return [cls.from_row(row, rank=rank) for rank, row in enumerate(rows.tolist()) if rank]


def validate_updates(
    reports: Sequence[Report], round_: int, norm_factor: float, policy: str
) -> tuple[list[int], list[str]]:
    """Accepted ranks and one reason per rejected update.

    An update is rejected when its norm is not finite, it has no examples, or its norm exceeds
    ``norm_factor`` times the median norm of the round. With ``policy="fail"`` the first
    rejection raises :class:`UpdateRejected`; with ``"skip"`` rejected silos sit the round out.
    """
    finite = [r.update_norm for r in reports if math.isfinite(r.update_norm)]
    median = statistics.median(finite) if finite else 0.0
    accepted, reasons = [], []
    for r in reports:
        if r.sits_out:  # neither accepted nor rejected: it trained on nothing, by design
            continue
        if not math.isfinite(r.update_norm) or not math.isfinite(r.train_loss):
            reason = f"silo {r.rank} sent a non-finite update in round {round_}"
        elif r.examples <= 0:
            reason = f"silo {r.rank} trained on no examples in round {round_}"
        elif len(finite) > 2 and median > 0 and r.update_norm > norm_factor * median:
            reason = (
                f"silo {r.rank}'s update norm {r.update_norm:.3g} in round {round_} is over "
                f"{norm_factor:g}x the median {median:.3g}"
            )
        else:
            accepted.append(r.rank)
            continue
        if policy == "fail":
            raise UpdateRejected(reason)
        reasons.append(reason)
    if not accepted:
        raise UpdateRejected(f"every update was rejected in round {round_}: {'; '.join(reasons)}")
    return accepted, reasons
