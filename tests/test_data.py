import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsilo.config import DataConfig
from fedsilo.data import (
    Encoded,
    batch_order,
    collate,
    label_ids,
    label_set,
    load_examples,
    load_splits,
    majority_share,
    partition,
)
from fedsilo.errors import DataError

ROWS = pd.DataFrame({"text": ["good film", "bad film", "fine", "awful"], "label": ["pos", "neg", "pos", "neg"]})


@pytest.mark.parametrize(
    "suffix, write",
    [
        (".csv", lambda f, p: f.to_csv(p, index=False)),
        (".jsonl", lambda f, p: f.to_json(p, orient="records", lines=True)),
        (".parquet", lambda f, p: f.to_parquet(p)),
    ],
)
def test_reads_csv_jsonl_parquet(tmp_path: Path, suffix: str, write) -> None:
    path = tmp_path / f"d{suffix}"
    write(ROWS, path)
    loaded = load_examples(str(path), "text", "label")["train"]
    assert loaded.texts == ROWS["text"].tolist() and loaded.labels == ROWS["label"].tolist()


def test_directory_with_train_and_test_files(tmp_path: Path) -> None:
    ROWS.to_csv(tmp_path / "train.csv", index=False)
    ROWS.iloc[:2].to_csv(tmp_path / "test.csv", index=False)
    splits = load_splits(str(tmp_path), None, DataConfig(dataset=str(tmp_path)), seed=0)
    assert len(splits.train) == 4 and len(splits.test) == 2


def test_held_out_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [i % 3 for i in range(100)]}).to_csv(
        path, index=False
    )
    cfg = DataConfig(dataset=str(path), eval_fraction=0.2)
    a, b = load_splits(str(path), None, cfg, seed=1), load_splits(str(path), None, cfg, seed=1)
    assert a.test.texts == b.test.texts and len(a.test) == 20
    assert not set(a.test.texts) & set(a.train.texts)


def test_integer_labels_stay_integers_and_sort_numerically(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [10, 2, 1]}).to_csv(path, index=False)
    assert label_set(load_examples(str(path), "text", "label")["train"].labels) == ["1", "2", "10"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "cannot be read"),
        (b"text,label\n", "holds no rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00binary", "cannot be read|not UTF-8"),
        ("text,label\nbon film,pos\n".encode("utf-16"), "cannot be read|not UTF-8|no column"),
        (b"words,label\nhello,pos\n", "no column 'text'"),
        (b"text,label\nhello,\n", "row 1 has an empty label"),
        (b"text,label\n,pos\n", "row 1 has no text"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_examples(str(path), "text", "label")


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_examples(str(tmp_path / "nope.csv"), "text", "label")


def test_unreachable_hub_dataset_is_one_line() -> None:
    with pytest.raises(DataError, match="neither a local path nor loadable from the hub"):
        load_examples("no-such-org/no-such-dataset", "text", "label")


def test_unknown_label_names_the_label_and_the_set() -> None:
    examples = load_examples.__globals__["Examples"](["a"], ["maybe"])
    with pytest.raises(DataError, match="label 'maybe' is not in the federation's label set \\[neg, pos\\]"):
        label_ids(examples, ["neg", "pos"], "silo 2's data")


def test_iid_partition_is_equal_disjoint_and_complete() -> None:
    labels = np.arange(103) % 2
    parts = partition(labels, 4, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert all((a == b).all() for a, b in zip(parts, partition(labels, 4, "iid", seed=0), strict=False))


def test_label_sorted_partition_gives_each_shard_few_labels() -> None:
    labels = np.repeat(np.arange(4), 25)
    parts = partition(labels, 4, "label-sorted", seed=0)
    assert [len(set(labels[p])) for p in parts] == [1, 1, 1, 1]


def test_dirichlet_partition_is_skewed_and_complete() -> None:
    labels = np.arange(2000) % 4
    parts = partition(labels, 4, "dirichlet", seed=3, alpha=0.1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))
    shares = [np.bincount(labels[p], minlength=4) / len(p) for p in parts]
    assert max(s.max() for s in shares) > 0.6  # small alpha: some silo is dominated by one label


def test_more_silos_than_examples_is_an_error() -> None:
    with pytest.raises(DataError, match="cannot split 3 training examples into 4 silos"):
        partition(np.zeros(3, dtype=int), 4, "iid", seed=0)


def test_dynamic_padding_pads_to_the_longest_row_only() -> None:
    data = Encoded([[5, 6, 7], [8], [9, 9]], np.array([0, 1, 0]), pad_id=0, max_length=128)
    batch = collate(data, np.array([0, 1]), attention_mask=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    # the authors' setting: no mask, padded to max_length, padding attended to
    unmasked = collate(data, np.array([0, 1]), attention_mask=False)
    assert "attention_mask" not in unmasked and unmasked["input_ids"].shape == (2, 128)


def test_length_grouping_reduces_padding_and_keeps_every_row() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=640).tolist()
    plain = batch_order(lengths, 32, (0,), shuffle=True, group_by_length=False)
    grouped = batch_order(lengths, 32, (0,), shuffle=True, group_by_length=True)
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert sorted(np.concatenate(grouped).tolist()) == list(range(640))
    assert padded(grouped) < 0.7 * padded(plain)


def test_majority_share_is_the_most_frequent_labels_fraction() -> None:
    data = Encoded([[1], [2], [3], [4], [5]], np.array([2, 0, 2, 1, 2]), 0, 8)
    assert majority_share(data) == 0.6
    assert math.isnan(majority_share(Encoded([], np.array([], dtype=np.int64), 0, 8)))
