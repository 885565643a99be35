"""One rank of the aggregation round-trip benchmark (benchmarks/run.py starts K + 1 of these).

The K + 1 processes form one gloo group through fedsilo's own ``comm`` module and then, in
alternating blocks (ABBA order, so drift in a shared machine's load hits both alike), run:

- fedsilo: ``aggregator.run_rounds`` on rank 0 and ``silo.run_rounds`` on ranks 1..K, unmodified.
  The aggregator's ``comm_seconds`` metric (reduce + averaging + global
  broadcast, clocked after every silo has reported) is captured from its tracker.
- raw floor: the same flat fp32 buffers, synchronised by a barrier, then one ``dist.reduce`` and
  one ``dist.broadcast`` written directly with torch.distributed, clocked on rank 0 the same way.
- tls (with ``--tls-pki``): the same unmodified round loops over the TLS star
  (:mod:`fedsilo.star`), which the ranks also form, on the next port. Rank 0 records its RSS
  after every round of these blocks, for the slope.

Only the model is a stand-in: :class:`ShapeAlike` has exactly the floating-point tensors (names
aside) of ``BertForSequenceClassification`` at the chosen size, so the flat vector (the model's
own storage, through ``bind_flat``, as in fedsilo's roles) and the wire are those of the real
model, but its forward pass touches only the classifier, so "local training" costs milliseconds
and each rank holds about two copies of the model instead of two plus gradients and activations
(K = 8 at 110M fits in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fedsilo import aggregator, comm, join, secagg, silo
from fedsilo.client import budget
from fedsilo.config import build_settings
from fedsilo.data import Encoded
from fedsilo.model import bind_flat, float_tensors
from fedsilo.workload import SiloData

SIZES: dict[str, dict[str, Any]] = {
    # MiniLM-L6 size (all-MiniLM-L6-v2 has this shape): ~22.7M parameters.
    "22M": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    # bert-base size: ~109.5M parameters.
    "110M": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def bert_config(size: str) -> Any:
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, **SIZES[size])
    config.num_labels = 2
    return config


def float_shapes(size: str) -> list[tuple[int, ...]]:
    """Shapes of the floating-point tensors fedsilo averages for this model size (run.py calls
    this once and hands the ranks a JSON file, so that they need not import transformers)."""
    from transformers import BertForSequenceClassification

    with torch.device("meta"):
        model = BertForSequenceClassification(bert_config(size))
    return [tuple(t.shape) for t in float_tensors(model)]


class ShapeAlike(torch.nn.Module):
    """BERT's floating-point tensors, shape for shape, with a forward pass that uses only the
    classifier (the last weight and bias): gradients and activations stay tiny."""

    def __init__(self, shapes: list[tuple[int, ...]], pause: float = 0.0) -> None:
        super().__init__()
        self.pause = pause  # seconds each training forward sleeps: a GPU's work, the CPU left free
        generator = torch.Generator().manual_seed(0)
        self.tensors = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02) for shape in shapes
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: Any) -> SimpleNamespace:
        if self.training and self.pause:
            time.sleep(self.pause)
        weight, bias = self.tensors[-2], self.tensors[-1]
        features = torch.ones(len(input_ids), weight.shape[1]) * input_ids[:, :1].float().mean()
        logits = features @ weight.T + bias
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


class Capture:
    """Stands in for fedsilo's FederationRun (MLflow and checkpoints): keeps the per-round metrics,
    and this process's RSS after each round when given a list for it. ``comm_seconds`` clocks the
    wire alone, so what the ledger would do is outside it anyway."""

    start_round = 1
    server_state: dict[str, torch.Tensor] = {}  # a fresh federation: FedAvg holds none

    def __init__(self, rss: list[int] | None = None) -> None:
        self.rounds: list[dict[str, float]] = []
        self.rss = rss

    def record(self, round_: int, weights: torch.Tensor, metrics: dict[str, float], server_state: Any = None) -> None:
        self.rounds.append(metrics)
        if self.rss is not None:
            self.rss.append(rss_now())


def rss_now() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def star_group(rank: int, silos: int, port: int, pki: Path, rounds: int) -> comm.Transport:
    """The TLS star among the same ranks, on ``port``, with the certificates in ``pki``."""
    from fedsilo import certs, star

    ca = pki / "ca.pem"
    if rank == 0:
        authority = certs.load_certificate(ca)
        door = star.StarListener(
            ("127.0.0.1", port),
            certs.server_context(pki / "aggregator.pem", pki / "aggregator.key", ca),
            lambda c: certs.check_peer(certs.peer_certificate(c), authority),
            silos,
            lambda _: None,
        )
        for hello in door.admit_silos(300).values():
            door.welcome(hello, join.Welcome(["0", "1"], 1, False, rounds))
        return door.form_group(600)
    context = certs.client_context(pki / f"silo-{rank}.pem", pki / f"silo-{rank}.key", ca)
    link = star.StarLink(star.dial(("127.0.0.1", port), context, "127.0.0.1", 300), rank)
    link.request_admission(
        {"settings": {}, "labels": ["0", "1"], "architecture": "", "train_examples": 4, "eval_examples": 0}, 300
    )
    return link.form_group(silos + 1, 600)


def tiny_data(rows: int) -> Encoded:
    return Encoded([[101, 2307, 102]] * rows, np.array([i % 2 for i in range(rows)], dtype=np.int64), 0, 8)


def raw_floor(rank: int, numel: int, rounds: int) -> list[float]:
    """One reduce up and one broadcast down per round of one flat fp32 buffer, straight
    torch.distributed. The buffer lives only for the block, so a rank never holds more copies of
    the model than fedsilo's own loop does."""
    flat = torch.full((numel,), 1e-3)
    seconds = []
    for _ in range(rounds):
        dist.barrier()  # every rank is here: clock the wire, as comm_seconds starts after the report
        started = time.perf_counter()
        dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)
        dist.broadcast(flat, src=0)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--silos", type=int, required=True)
    parser.add_argument("--shapes", type=Path, required=True, help="JSON list of tensor shapes")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of each kind, alternating ABBA")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="rank 0 writes its timings here (JSON)")
    parser.add_argument("--tls-pki", type=Path, help="directory of `fedsilo certs` files: add TLS star blocks")
    parser.add_argument(
        "--kinds",
        default="fedsilo,floor",
        help="which blocks, rotated: fedsilo, floor, tls, secagg (fedsilo over gloo with --secure-aggregation)",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=0.0,
        help="each silo's stand-in local training sleeps this long per round (the CPU free, as beside a GPU)",
    )
    args = parser.parse_args()
    # The import floor: what the aggregator imports in any case (transformers' BERT and DistilBERT
    # modules, which evaluation reaches through fedsilo.last_layer, bring ~110 MiB; the TLS stack),
    # measured before any model or buffer exists.
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.distilbert.modeling_distilbert  # noqa: F401

    from fedsilo import certs, star  # noqa: F401

    floor_rss = rss_now()

    shapes = [tuple(s) for s in json.loads(args.shapes.read_text())]
    model = ShapeAlike(shapes, args.train_seconds if args.rank else 0.0)
    numel = sum(int(np.prod(s)) for s in shapes)
    # Blocks in ABBA order (fedsilo, floor, floor, fedsilo, ...; with three kinds, ABC CBA): drift
    # in a shared machine's load falls on every kind alike.
    kinds = tuple(args.kinds.split(","))
    schedule = [kind for i in range(args.blocks) for kind in (kinds if i % 2 == 0 else kinds[::-1])]
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ckpt-") as ckpt:
        settings = build_settings(
            {
                "model": "shape-alike",
                "dataset": "unused.csv",
                "silos": args.silos,
                "rounds": args.rounds,
                "local_epochs": 1,
                "batch_size": 32,
                "aggregator": f"127.0.0.1:{args.port}",
                "backend": "gloo",
                "device": "cpu",
                "join_timeout": 300,
                "round_timeout": 600,
                "checkpoint_dir": ckpt,
            }
        )
        secure = settings.replace(secure_aggregation=True)
        address = ("127.0.0.1", args.port)
        groups: dict[str, comm.Transport] = {}
        if {"fedsilo", "floor", "secagg"} & set(kinds):
            store = comm.open_store(args.rank, *address, timeout=300)
            groups["fedsilo"] = comm.form_group(
                store, args.rank, args.silos + 1, "gloo", torch.device("cpu"), 600, address
            )
        if "tls" in kinds:
            groups["tls"] = star_group(args.rank, args.silos, args.port + 1, args.tls_pki, args.rounds)
        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        rss_by_round: list[int] = []
        try:
            for kind in schedule:
                if kind == "floor":
                    seconds["floor"] += raw_floor(args.rank, numel, args.rounds)
                elif args.rank == 0:
                    ledger = Capture(rss_by_round if kind == "tls" else None)
                    weights = bind_flat(model)  # as aggregator.serve makes it
                    group = groups["fedsilo" if kind == "secagg" else kind]
                    if kind == "secagg":
                        secagg.relay(group)
                    rounds = aggregator.Rounds(
                        secure if kind == "secagg" else settings,
                        group,
                        model,
                        weights,
                        tiny_data(2),
                        lambda _: None,
                        budget(settings, {}),
                    )
                    aggregator.run_rounds(rounds, ledger)  # type: ignore[arg-type]
                    del weights, rounds
                    seconds[kind] += [m["comm_seconds"] for m in ledger.rounds]
                else:
                    data = SiloData(tiny_data(4), None, ["0", "1"])
                    group = groups["fedsilo" if kind == "secagg" else kind]
                    secrets = secagg.exchange(group, args.rank, None) if kind == "secagg" else None
                    silo.run_rounds(
                        secure if kind == "secagg" else settings,
                        group,
                        model,
                        data,
                        args.rank,
                        join.Welcome(["0", "1"], 1, False, args.rounds),
                        lambda _: None,
                        secrets,
                    )
        finally:
            for group in groups.values():
                group.close()
    if args.rank == 0 and args.out:
        args.out.write_text(
            json.dumps(
                {
                    "silos": args.silos,
                    "numel": numel,
                    "model_bytes": numel * 4,
                    "fedsilo_comm_seconds": seconds.get("fedsilo", []),
                    "floor_seconds": seconds.get("floor", []),
                    "tls_comm_seconds": seconds.get("tls", []),
                    "secagg_comm_seconds": seconds.get("secagg", []),
                    "tls_rss_by_round": rss_by_round,
                    "import_floor_rss": floor_rss,
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "threads": torch.get_num_threads(),
                    "omp": os.environ.get("OMP_NUM_THREADS"),
                }
            )
        )


if __name__ == "__main__":
    main()
