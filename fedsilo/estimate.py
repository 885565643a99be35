"""How long a sweep's cells will take, from a short measured probe (``fedsilo sweep --dry-run --estimate``).

A round trains every client on its shard, so all the training rows once per local epoch whatever K
is, then evaluates the test rows once. The probe times both on a few batches of the cell's own
rows (their real lengths decide the padding) with the cell's model and settings, once per distinct
workload, and scales up. Only a guide: a shared machine's speed varies by several times, and
padding, caches and K's per-client batch remainders are not modelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    """What decides a probe's result: cells that share it share one probe (K changes what each
    client trains, not the round's work)."""
    model, data, train = settings.model, settings.data, settings.train
    return (
        model.model_dump_json(),  # the model, its inputs, LoRA
        data.dataset,
        data.test_dataset,
        data.max_examples,
        data.eval_fraction,
        train.batch_size,
        train.eval_batch_size,
        train.optimizer,
        train.fast_paths,
        train.gradient_checkpointing,
        train.device,
        settings.privacy.enabled,
    )


def _head(data: Encoded, rows: int) -> Encoded:
    return Encoded(data.input_ids[:rows], data.labels[:rows], data.pad_id, data.max_length)


def _per_row(seconds_for: Callable[[Encoded], float], data: Encoded, batch_size: int) -> float:
    """Seconds per row of ``seconds_for`` over PROBE_BATCHES batches of ``data``'s first rows, after
    one untimed batch (first touch of the model and its buffers)."""
    seconds_for(_head(data, batch_size))
    sample = _head(data, PROBE_BATCHES * batch_size)
    return seconds_for(sample) / len(sample)


def probe(settings: Settings) -> Speed:
    """Time PROBE_BATCHES training batches and as many evaluation batches of ``settings``' own rows,
    with the cell's own model (LoRA, a decoder) and local round (its optimiser, DP-SGD)."""
    from fedsilo.client import train_round
    from fedsilo.model import build_classifier, load_tokenizer
    from fedsilo.train import evaluate, resolve_device
    from fedsilo.workload import client_shards

    train, inputs = settings.train, settings.model
    tokenizer = load_tokenizer(inputs.model)
    (rows,), test, labels = client_shards(settings, tokenizer, 1)
    model = build_classifier(settings, labels, tokenizer).to(resolve_device(train.device))

    def seconds_to_train(data: Encoded) -> float:  # a round is local_epochs passes over the rows
        return train_round(settings, model, data, 1, 1, lambda *_: None).seconds / train.local_epochs

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

    train_row = _per_row(seconds_to_train, rows, train.batch_size)
    eval_row = _per_row(seconds_to_evaluate, test, train.eval_batch_size)
    return Speed(train_row, eval_row, len(rows), len(test))
