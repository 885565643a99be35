"""The client loop of ``fedsilo simulate`` in one process: K = 32 x n rows vs K = 1 x 32n rows.

``benchmarks/run.py`` times the ``fedsilo simulate`` command itself, one process per run; on a
shared machine those runs see different load. This worker alternates the two client loops in
one process (``fedsilo.simulate.train_client`` for every client, as ``run_rounds`` calls it), so
the ratio it gives isolates what K = 32 costs over K = 1: the per-client bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-client", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round (the paper's protocol: 2)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fedsilo import simulate
    from fedsilo.client import budget
    from fedsilo.config import build_settings
    from fedsilo.data import batch_order, encode
    from fedsilo.model import bind_flat

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    n, clients = args.per_client, 32
    frame = pd.read_csv(args.data).sample(n * clients, random_state=2)
    texts, labels = frame["text"].tolist(), (frame["label"].astype(str) == "rotten").to_numpy(np.int64)
    one = [encode(texts, labels, tokenizer, 128)]
    many = [encode(texts[i * n : (i + 1) * n], labels[i * n : (i + 1) * n], tokenizer, 128) for i in range(clients)]
    settings = build_settings(
        {
            "model": str(args.model),
            "dataset": str(args.data),
            "local_epochs": args.epochs,
            "batch_size": n,
            "device": "cpu",
        }
    )
    local = bind_flat(model)  # as fedsilo.simulate.simulate makes them
    weights, summed = local.clone(), torch.zeros_like(local)

    def clients(shards: list) -> simulate.Clients:
        return simulate.Clients(
            settings, model, local, weights, shards, shards[0], lambda _: None, budget(settings, {})
        )

    # What each client's update costs on top of its training (form it, its norm, add it to the
    # sum, restore the global model), clocked apart: the part of the ratio that K itself adds.
    update_seconds = [0.0]
    take_update = simulate.take_update

    def clocked(*args: object) -> float:
        started = time.perf_counter()
        try:
            return take_update(*args)  # type: ignore[arg-type]
        finally:
            update_seconds[0] += time.perf_counter() - started

    simulate.take_update = clocked  # type: ignore[assignment]

    def round_(shards: list) -> float:
        update_seconds[0] = 0.0
        for k in range(1, len(shards) + 1):
            simulate.train_client(clients(shards), k, 1, summed)
        return update_seconds[0]

    def padded_tokens(shards: list) -> int:
        """Tokens the forward passes see (rows x longest row, per batch), as local_train batches
        client k in round 1, every epoch: the two sides' data differ in padding, not only in client count."""
        t = settings.train
        return sum(
            len(rows) * max(len(shard.input_ids[i]) for i in rows)
            for k, shard in enumerate(shards, start=1)
            for epoch in range(args.epochs)
            for rows in batch_order(
                [len(s) for s in shard.input_ids], n, (t.seed, k, 1, epoch), True, t.group_by_length
            )
        )

    seconds: dict[str, list[float]] = {"1": [], "32": []}
    updates: dict[str, list[float]] = {"1": [], "32": []}
    round_(many[:2])  # warm-up
    for rep in range(args.reps):
        for k, shards in (("1", one), ("32", many)) if rep % 2 == 0 else (("32", many), ("1", one)):
            started = time.perf_counter()
            updates[k].append(round_(shards))
            seconds[k].append(time.perf_counter() - started)
    # Each repetition runs the two back to back, so their ratio is free of the drift between
    # repetitions (on these machines a round's time wanders by 10-15 % over minutes).
    pairs = [b / a for a, b in zip(seconds["1"], seconds["32"], strict=False)]
    args.out.write_text(
        json.dumps(
            {
                "seconds": seconds,
                "update_seconds": updates,
                "rows": n * clients,
                "pair_ratios": pairs,
                "padded_tokens": {"1": padded_tokens(one), "32": padded_tokens(many)},
                "ratio": statistics.median(pairs),
            }
        )
    )


if __name__ == "__main__":
    main()
