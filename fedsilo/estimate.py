"""How long a sweep's cells will take, from a short measured probe (``fedsilo sweep --dry-run --estimate``).

A round trains every client on its shard, so all the training rows once per local epoch whatever K
is, then evaluates the test rows once. The probe times both on a few batches of the cell's own
rows (their real lengths decide the padding) with the cell's model and settings, once per distinct
workload, and scales up. Only a guide: a shared machine's speed varies by several times, and
padding, caches and K's per-client batch remainders are not modelled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedsilo.config import Settings
from fedsilo.data import Encoded

# Batches timed per probe, after one untimed batch (first touch of the model and its buffers).
PROBE_BATCHES = 3


@dataclass(frozen=True)
class Speed:
    """Measured seconds per row, and the sizes a cell's rounds work on."""

    train_row: float
    eval_row: float
    train_rows: int
    test_rows: int

    def cell_seconds(self, settings: Settings) -> float:
        per_round = settings.train.local_epochs * self.train_rows * self.train_row + self.test_rows * self.eval_row
        return settings.federation.rounds * per_round


def workload_key(settings: Settings) -> tuple[object, ...]:
    """What decides a probe's result: cells that share it share one probe."""
    model, data, train = settings.model, settings.data, settings.train
    return (
        model.model,
        model.max_length,
        model.attention_mask,
        data.dataset,
        data.test_dataset,
        data.max_examples,
        data.eval_fraction,
        train.batch_size,
        train.eval_batch_size,
        train.fast_paths,
        train.device,
    )


def _head(data: Encoded, rows: int) -> Encoded:
    return Encoded(data.input_ids[:rows], data.labels[:rows], data.pad_id, data.max_length)


def probe(settings: Settings) -> Speed:
    """Time PROBE_BATCHES training batches and as many evaluation batches of ``settings``' own rows."""
    from fedsilo.model import build_model, load_tokenizer
    from fedsilo.train import evaluate, local_train, resolve_device
    from fedsilo.workload import client_shards

    train, inputs = settings.train, settings.model
    (rows,), test, labels = client_shards(settings, load_tokenizer(inputs.model), 1)
    model = build_model(inputs.model, labels, train.seed).to(resolve_device(train.device))

    def seconds_to_train(data: Encoded) -> float:
        started = time.perf_counter()
        local_train(
            model,
            data,
            epochs=1,
            batch_size=train.batch_size,
            lr=train.lr,
            seed=(train.seed, 0, 0),
            attention_mask=inputs.attention_mask,
            fast_paths=train.fast_paths,
        )
        return time.perf_counter() - started

    seconds_to_train(_head(rows, train.batch_size))  # warm-up, untimed
    sample = _head(rows, PROBE_BATCHES * train.batch_size)
    train_row = seconds_to_train(sample) / len(sample)

    def seconds_to_evaluate(data: Encoded) -> float:
        started = time.perf_counter()
        evaluate(
            model,
            data,
            batch_size=train.eval_batch_size,
            attention_mask=inputs.attention_mask,
            fast_paths=train.fast_paths,
        )
        return time.perf_counter() - started

    seconds_to_evaluate(_head(test, train.batch_size))  # warm-up, untimed
    held_out = _head(test, PROBE_BATCHES * train.eval_batch_size)
    eval_row = seconds_to_evaluate(held_out) / len(held_out)
    return Speed(train_row, eval_row, len(rows), len(test))
