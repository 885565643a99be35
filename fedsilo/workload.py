"""What one rank needs before the federation starts: its data, the label set, the model.

The distributed roles and the in-process simulation both build from here, so a silo in
``fedsilo run`` and client k in ``fedsilo simulate`` train on exactly the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsilo.config import Settings
from fedsilo.data import Encoded, Examples, Splits, encode, label_ids, label_set, load_splits, load_test, partition
from fedsilo.errors import ConfigError, DataError


@dataclass(frozen=True)
class SiloData:
    train: Encoded
    eval: Encoded | None
    labels: list[str]


def shared_dataset(settings: Settings) -> bool:
    """One dataset split into shards (iid, label-sorted, dirichlet) versus each silo's own."""
    return settings.data.partition != "none"


def _dataset(settings: Settings, who: str) -> str:
    if not settings.data.dataset:
        raise ConfigError(f"{who} needs a dataset: set --dataset (or 'dataset' in the config file)")
    return settings.data.dataset


def _labels_for(settings: Settings, train: Examples, source: str) -> list[str]:
    """``--labels``, else the labels found in the training rows: at least two of them."""
    if settings.data.labels:
        return list(settings.data.labels)
    found = label_set(train.labels)
    if len(found) < 2:
        # One label would build a 1-output head, which transformers treats as regression.
        raise DataError(
            f"{source}: the training data holds only the label(s) [{', '.join(found)}]; "
            "a classifier needs at least two (set --labels to the full set)"
        )
    return found


def _encode(examples: Examples, labels: list[str], where: str, tokenizer: Any, settings: Settings) -> Encoded:
    ids = label_ids(examples, labels, where)
    return encode(examples.texts, ids, tokenizer, settings.model.max_length)


def _shared(settings: Settings) -> tuple[Splits, list[str]]:
    source = _dataset(settings, "the federation")
    splits = load_splits(source, settings.data.test_dataset, settings.data, settings.train.seed)
    return splits, _labels_for(settings, splits.train, source)


def shard_rows(settings: Settings, splits: Splits, labels: list[str], clients: int) -> list[np.ndarray]:
    """Row indices of each client's shard of the shared training data."""
    ids = label_ids(splits.train, labels, settings.data.dataset or "dataset")
    data = settings.data
    return partition(ids, clients, data.partition, settings.train.seed, data.dirichlet_alpha)


def client_shards(settings: Settings, tokenizer: Any, clients: int) -> tuple[list[Encoded], Encoded, list[str]]:
    """Every client's encoded shard and the test set (what the simulation holds in memory)."""
    splits, labels = _shared(settings)
    assert splits.test is not None  # load_splits always yields a test set
    shards = [
        _encode(splits.train.subset(rows.tolist()), labels, "training data", tokenizer, settings)
        for rows in shard_rows(settings, splits, labels, clients)
    ]
    return shards, _encode(splits.test, labels, "test data", tokenizer, settings), labels


def silo_data(settings: Settings, rank: int, tokenizer: Any) -> SiloData:
    """Silo ``rank``'s training rows (its shard, or all of its own file) and evaluation rows."""
    if shared_dataset(settings):
        splits, labels = _shared(settings)
        rows = shard_rows(settings, splits, labels, settings.federation.silos)[rank - 1]
        train = _encode(splits.train.subset(rows.tolist()), labels, "training data", tokenizer, settings)
        return SiloData(train, None, labels)
    source = _dataset(settings, f"silo {rank}")
    # Private data: hold out part of this silo's own rows, in case the aggregator has no test set.
    splits = load_splits(source, settings.data.test_dataset, settings.data, settings.train.seed + rank)
    labels = _labels_for(settings, splits.train, source)
    where = f"silo {rank}'s data ({source})"
    assert splits.test is not None
    return SiloData(
        _encode(splits.train, labels, where, tokenizer, settings),
        _encode(splits.test, labels, where, tokenizer, settings),
        labels,
    )


def aggregator_test_data(settings: Settings, tokenizer: Any) -> tuple[Encoded | None, list[str] | None]:
    """The aggregator's test set and label set, when it has data at all.

    With private silo data the aggregator usually has none: then silos evaluate, and the label
    set comes from ``labels`` or from the silos' agreement.
    """
    if shared_dataset(settings):
        splits, labels = _shared(settings)
        assert splits.test is not None
        return _encode(splits.test, labels, "test data", tokenizer, settings), labels
    given = list(settings.data.labels) if settings.data.labels else None
    if settings.data.test_dataset is None:
        return None, given
    test = load_test(settings.data.test_dataset, settings.data)
    labels = given or label_set(test.labels)
    return _encode(test, labels, f"test data ({settings.data.test_dataset})", tokenizer, settings), labels
