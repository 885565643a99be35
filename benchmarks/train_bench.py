"""Local-training throughput: fedsilo's ``local_train`` against ``transformers.Trainer``.

One process loads the real MiniLM once, keeps its initial weights, and then, repetition after
repetition with the order rotated each time, trains one epoch over the same rows with each
variant, restoring the initial weights first:

- fedsilo dynamic: ``local_train`` (batches padded to their longest row, random order)
- fedsilo grouped: ``local_train(group_by_length=True)``
- Trainer padded-128: every row padded to 128 tokens, as the paper's code did
- Trainer best: ``DataCollatorWithPadding`` (dynamic) + ``train_sampling_strategy="group_by_length"``

Same hyperparameters everywhere: plain SGD (no momentum), lr 2e-5, constant schedule, no
warmup, no weight decay, no gradient clipping, batch 32, max length 128, one epoch. Tokenising
is done before the clock starts for all four; batching/collation is inside it for all four.
Needs accelerate (``benchmarks/setup-trainer.sh``) on PYTHONPATH for the Trainer variants.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

VARIANTS = ("fedsilo dynamic", "fedsilo grouped", "Trainer padded-128", "Trainer best")
BATCH, LR, MAX_LENGTH = 32, 2e-5, 128


def load_rows(path: Path, rows: int, seed: int) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    frame = pd.read_csv(path).sample(rows, random_state=seed)
    labels = sorted(frame["label"].astype(str).unique())
    return frame["text"].tolist(), frame["label"].astype(str).map(labels.index).to_numpy(np.int64)


def trainer_run(
    model: Any, tokenizer: Any, texts: list[str], labels: np.ndarray, best: bool, workdir: str
) -> Callable[[], None]:
    import datasets
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    padding = False if best else "max_length"
    encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=padding)
    dataset = datasets.Dataset.from_dict({**encoded, "labels": labels.tolist()})
    args = TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="group_by_length" if best else "random",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    collator = DataCollatorWithPadding(tokenizer) if best else default_data_collator

    def run() -> None:
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()

    return run


def fedsilo_run(model: Any, tokenizer: Any, texts: list[str], labels: np.ndarray, grouped: bool) -> Callable[[], None]:
    from fedsilo.data import encode
    from fedsilo.train import local_train

    data = encode(texts, labels, tokenizer, MAX_LENGTH)

    def run() -> None:
        local_train(model, data, epochs=1, batch_size=BATCH, lr=LR, seed=(0, 1, 1), group_by_length=grouped)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    texts, labels = load_rows(args.data, args.rows, seed=0)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]

    with tempfile.TemporaryDirectory() as workdir:
        runs = {
            "fedsilo dynamic": fedsilo_run(model, tokenizer, texts, labels, grouped=False),
            "fedsilo grouped": fedsilo_run(model, tokenizer, texts, labels, grouped=True),
            "Trainer padded-128": trainer_run(model, tokenizer, texts, labels, best=False, workdir=workdir),
            "Trainer best": trainer_run(model, tokenizer, texts, labels, best=True, workdir=workdir),
        }
        # warm up every path once on one batch (allocator, oneDNN kernels, imports)
        warm_texts, warm_labels = texts[:BATCH], labels[:BATCH]
        for name in VARIANTS:
            maker = fedsilo_run if name.startswith("fedsilo") else trainer_run
            kwargs = (
                {"grouped": name.endswith("grouped")}
                if name.startswith("fedsilo")
                else {"best": name.endswith("best"), "workdir": workdir}
            )
            maker(model, tokenizer, warm_texts, warm_labels, **kwargs)()  # type: ignore[operator]

        # Wall time is what the targets are about; CPU time (all threads of this process)
        # is the cross-check on a shared machine, where other people's load stretches wall time.
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
            for name in order:
                model.load_state_dict(initial)
                started, cpu_started = time.perf_counter(), time.process_time()
                runs[name]()
                seconds[name].append(time.perf_counter() - started)
                cpu_seconds[name].append(time.process_time() - cpu_started)
                print(f"rep {rep + 1}/{args.reps} {name}: {args.rows / seconds[name][-1]:.1f} samples/s", flush=True)

    args.out.write_text(
        json.dumps(
            {
                "rows": args.rows,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "threads": torch.get_num_threads(),
                "mean_tokens": float(np.mean(lengths)),
                "max_tokens": int(np.max(lengths)),
                "omp": os.environ.get("OMP_NUM_THREADS"),
            }
        )
    )


if __name__ == "__main__":
    main()
