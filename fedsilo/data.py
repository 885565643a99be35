"""Load text data, fix the label set, split it into silo shards, tokenise once, batch.

Nothing here knows about federation: a silo asks for its shard by index, the aggregator for the
test set. Every split is seeded, so every rank computes the same shards without talking.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.config import DataConfig
from fedsilo.errors import DataError, first_line

READERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Examples:
    """Texts with their raw labels (strings or integers), row for row."""

    texts: list[str]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> Examples:
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices])


@dataclass(frozen=True)
class Splits:
    train: Examples
    test: Examples | None


def torch_seed(seed: Sequence[int]) -> int:
    """One torch seed from a tuple (run seed, client, round, ...): torch takes a single integer, and
    numpy's SeedSequence mixes the parts so that nearby tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0] >> 1)


def _read_file(path: Path) -> Any:
    """One local file as a pandas DataFrame."""
    import pandas as pd

    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type (use {', '.join(sorted(READERS))})")
    try:
        if kind == "csv":
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        elif kind == "json":
            frame = pd.read_json(path, lines=path.suffix.lower() == ".jsonl")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (is it binary or in another encoding?)") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot be read as {kind}: {first}") from None
    if frame.empty:
        raise DataError(f"{path}: holds no rows")
    return frame


def _frame_to_examples(frame: Any, source: str, text_column: str, label_column: str) -> Examples:
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise DataError(f"{source}: no column '{column}' (columns: {', '.join(map(str, frame.columns))})")
    texts, labels = frame[text_column].tolist(), frame[label_column].tolist()
    for row, (text, label) in enumerate(zip(texts, labels, strict=False), start=1):
        if not isinstance(text, str):
            raise DataError(f"{source}: row {row} has no text in column '{text_column}' (got {text!r})")
        if label is None or (isinstance(label, float) and math.isnan(label)) or str(label).strip() == "":
            raise DataError(f"{source}: row {row} has an empty label in column '{label_column}'")
    return Examples(texts, [_normalise_label(label) for label in labels])


def _normalise_label(label: Any) -> Any:
    """Integers stay integers (also when pandas read them as 3.0); everything else is a string."""
    if isinstance(label, (bool, np.bool_)):
        return str(label)
    if isinstance(label, (int, np.integer)):
        return int(label)
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        return int(label)
    return str(label).strip()


def _load_local(path: Path, text_column: str, label_column: str) -> dict[str, Examples]:
    if path.is_file():
        return {"train": _frame_to_examples(_read_file(path), str(path), text_column, label_column)}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in READERS)
    if not files:
        raise DataError(f"{path}: no {'/'.join(sorted(READERS))} files in this directory")
    by_split: dict[str, list[Path]] = {}
    for file in files:
        split = file.stem.split(".")[0].split("-")[0]
        by_split.setdefault(split if split in ("train", "test") else "train", []).append(file)
    out = {}
    for split, members in by_split.items():
        parts = [_frame_to_examples(_read_file(f), str(f), text_column, label_column) for f in members]
        out[split] = Examples([t for p in parts for t in p.texts], [lab for p in parts for lab in p.labels])
    return out


def _load_hub(name: str, text_column: str, label_column: str) -> dict[str, Examples]:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # the hub client raises many types; all mean "cannot load it"
        raise DataError(
            f"dataset '{name}' is neither a local path nor loadable from the hub: {first_line(exc)}"
        ) from None
    return {
        split: _frame_to_examples(part.to_pandas(), f"{name}[{split}]", text_column, label_column)
        for split, part in loaded.items()
        if split in ("train", "test")
    }


def load_examples(source: str, text_column: str, label_column: str) -> dict[str, Examples]:
    """A local file or directory, else a hub dataset: ``{"train": ..., "test"?: ...}``."""
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, text_column, label_column)
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in READERS:
        raise DataError(f"data file not found: {source}")
    return _load_hub(source, text_column, label_column)


def load_test(source: str, cfg: DataConfig) -> Examples:
    """All rows of a test source: its test split if it has one, else everything in it."""
    loaded = load_examples(source, cfg.text_column, cfg.label_column)
    return loaded.get("test") or loaded["train"]


def seeded_permutation(n: int, seed: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, salt]).permutation(n)


def load_splits(source: str, test_source: str | None, cfg: DataConfig, seed: int) -> Splits:
    """Train and test examples: the test split, else ``test_source``, else a seeded hold-out."""
    loaded = load_examples(source, cfg.text_column, cfg.label_column)
    if "train" not in loaded:
        raise DataError(f"{source}: has no training data (no 'train' split)")
    train, test = loaded["train"], loaded.get("test")
    if test_source is not None:
        test = load_test(test_source, cfg)
    elif test is None:
        order = seeded_permutation(len(train), seed, salt=1)
        n_test = max(1, round(len(train) * cfg.eval_fraction))
        if len(train) - n_test < 1:
            raise DataError(f"{source}: too few rows ({len(train)}) to hold out a test set")
        test, train = train.subset(order[:n_test].tolist()), train.subset(order[n_test:].tolist())
    if cfg.max_examples is not None and cfg.max_examples < len(train):
        train = train.subset(seeded_permutation(len(train), seed, salt=2)[: cfg.max_examples].tolist())
    return Splits(train, test)


def label_set(labels: Sequence[Any]) -> list[str]:
    """Sorted distinct labels as strings (integers sort numerically)."""
    distinct = set(labels)
    if all(isinstance(v, int) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    return sorted(str(v) for v in distinct)


def label_ids(examples: Examples, labels: list[str], where: str) -> np.ndarray:
    """Map raw labels to indices of the federation's label set; unknown labels are an error."""
    index = {name: i for i, name in enumerate(labels)}
    ids = np.empty(len(examples), dtype=np.int64)
    for row, label in enumerate(examples.labels):
        found = index.get(str(label))
        if found is None:
            raise DataError(
                f"{where}: label '{label}' is not in the federation's label set "
                f"[{', '.join(labels)}] (set --labels to the full set)"
            )
        ids[row] = found
    return ids


def partition(label_idx: np.ndarray, shards: int, scheme: str, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    """Split row indices into ``shards`` parts: iid, label-sorted or dirichlet; seeded."""
    n = len(label_idx)
    if n < shards:
        raise DataError(f"cannot split {n} training examples into {shards} silos")
    order = seeded_permutation(n, seed, salt=3)
    if scheme in ("iid", "none"):
        parts = np.array_split(order, shards)
    elif scheme == "label-sorted":
        # The authors' non-IID split: sort by label, cut contiguous shards.
        parts = np.array_split(order[np.argsort(label_idx[order], kind="stable")], shards)
    elif scheme == "dirichlet":
        rng = np.random.default_rng([seed, 4])
        buckets: list[list[int]] = [[] for _ in range(shards)]
        for label in np.unique(label_idx):
            rows = order[label_idx[order] == label]
            cuts = (np.cumsum(rng.dirichlet(np.full(shards, alpha))) * len(rows)).astype(int)[:-1]
            for bucket, piece in zip(buckets, np.split(rows, cuts), strict=False):
                bucket.extend(piece.tolist())
        parts = [np.array(sorted(b), dtype=np.int64) for b in buckets]
    else:
        raise DataError(f"unknown partition scheme '{scheme}'")
    empty = [i + 1 for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"partition '{scheme}' left silo(s) {empty} without data (raise dirichlet_alpha or use fewer silos)"
        )
    return [np.asarray(p, dtype=np.int64) for p in parts]


@dataclass(frozen=True)
class Encoded:
    """Token ids without padding (padding happens per batch) and label indices."""

    input_ids: list[list[int]]
    labels: np.ndarray
    pad_id: int
    max_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


def majority_share(data: Encoded) -> float:
    """The accuracy of always answering the most frequent label: the floor a classifier must beat."""
    return float(np.bincount(data.labels).max() / len(data)) if len(data) else float("nan")


def encode(texts: list[str], label_idx: np.ndarray, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenise once; batches are padded later to their own longest row (dynamic padding)."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(list(ids), label_idx, pad, max_length)


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: Sequence[int], shuffle: bool, group_by_length: bool
) -> list[np.ndarray]:
    """Row indices per batch. Length grouping sorts within windows of 50 batches, then shuffles."""
    n = len(lengths)
    order = np.random.default_rng(list(seed)).permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        window = batch_size * 50
        lens = np.asarray(lengths)
        order = np.concatenate(
            [w[np.argsort(-lens[w], kind="stable")] for w in np.array_split(order, max(1, math.ceil(n / window)))]
        )
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and shuffle:
        perm = np.random.default_rng([*seed, 7]).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def collate(data: Encoded, rows: np.ndarray, attention_mask: bool) -> dict[str, torch.Tensor]:
    """Pad one batch to its longest row; without a mask, to max_length as the authors' code did."""
    seqs = [data.input_ids[i] for i in rows]
    width = max(len(s) for s in seqs) if attention_mask else data.max_length
    ids = torch.full((len(seqs), width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    batch = {"input_ids": ids, "labels": torch.from_numpy(data.labels[rows])}
    if attention_mask:
        batch["attention_mask"] = mask
    return batch


def iterate_batches(
    data: Encoded,
    batch_size: int,
    seed: Sequence[int],
    *,
    shuffle: bool,
    group_by_length: bool,
    attention_mask: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    lengths = [len(s) for s in data.input_ids]
    for rows in batch_order(lengths, batch_size, seed, shuffle, group_by_length):
        yield collate(data, rows, attention_mask)
