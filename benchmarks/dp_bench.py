"""DP-SGD's local training throughput against plain ``local_train``, on the real MiniLM.

    .venv/bin/python benchmarks/dp_bench.py                # 256 rows, batch 32, 3 repetitions
    .venv/bin/python benchmarks/dp_bench.py --rows 128 --repeats 2
    .venv/bin/python benchmarks/dp_bench.py --peft lora     # both sides train LoRA adapters (r 8) and the head

One process loads MiniLM once and alternates (ABAB...) one epoch of ``local_train`` (plain SGD,
the [CLS]-only layer and sparse embedding gradients on: fedsilo's default) with one epoch's worth of
DP-SGD steps (``dp.private_train``: Poisson batches of expected size 32, per-example gradients
from Opacus's hooks, clipping, noise), both from the same initial weights. Throughput is examples
per second; DP-SGD's examples are the ones its Poisson batches drew. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from fedsilo import dp
from fedsilo.config import build_settings
from fedsilo.model import bind_flat, build_classifier, load_tokenizer
from fedsilo.train import local_train, make_optimizer
from fedsilo.workload import client_shards

HERE = Path(__file__).resolve().parent
TARGET = 0.5  # DP-SGD / plain, at least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(HERE.parent / "data" / "minilm"))
    parser.add_argument("--dataset", default=str(HERE.parent / "data" / "rotten_tomatoes.csv"))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft", choices=("none", "lora"), default="none", help="train LoRA adapters on both sides")
    args = parser.parse_args()
    settings = build_settings(
        {
            "model": args.model,
            "dataset": args.dataset,
            "silos": 1,
            "max_examples": args.rows,
            "batch_size": 32,
            "peft": args.peft,
        }
    )
    tokenizer = load_tokenizer(args.model)
    (shard,), _, labels = client_shards(settings, tokenizer, 1)
    model = build_classifier(settings, labels, tokenizer)
    flat = bind_flat(model)
    start = flat.clone()
    plan = dp.Plan(1.0, 1.0, 32 / len(shard), max(1, round(len(shard) / 32)), 1e-5, "rdp", None)
    rates: dict[str, list[float]] = {"plain": [], "DP-SGD": []}
    for repeat in range(args.repeats):
        for kind in ("plain", "DP-SGD") if repeat % 2 == 0 else ("DP-SGD", "plain"):
            flat.copy_(start)
            began = time.perf_counter()
            if kind == "plain":
                result = local_train(model, shard, epochs=1, batch_size=32, lr=2e-5, seed=(repeat,))
                examples = len(shard)
            else:
                result = dp.private_train(
                    model,
                    shard,
                    plan,
                    seed=(repeat,),
                    make_optimizer=lambda p: make_optimizer(p, "sgd", 2e-5, 0.0),
                )
                examples = round(plan.sample_rate * len(shard) * plan.steps_per_round)  # expected draws
            rates[kind].append(examples / (time.perf_counter() - began))
            print(f"{kind}: {rates[kind][-1]:.1f} examples/s (loss {result.mean_loss:.3f})", flush=True)
    plain, private = statistics.median(rates["plain"]), statistics.median(rates["DP-SGD"])
    print("\n| trains | rows | plain (ex/s) | DP-SGD (ex/s) | DP-SGD / plain | target |")
    print("|---|---|---|---|---|---|")
    trains = "LoRA adapters and head" if args.peft == "lora" else "every weight"
    print(f"| {trains} | {len(shard)} | {plain:.1f} | {private:.1f} | {private / plain:.2f}x | >= {TARGET}x |")


if __name__ == "__main__":
    main()
