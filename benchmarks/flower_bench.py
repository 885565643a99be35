"""Flower's side of the aggregation round-trip benchmark; runs in benchmarks/.venv-flower.

``--role server``: Flower's legacy deployment API (``flwr.server.start_server``) with its stock
``FedAvg``, the global model as NumPy arrays of the given shapes (the same tensors as the BERT
model that fedsilo sends flat). ``--role client``: ``flwr.client.start_client`` with a
``NumPyClient`` whose ``fit`` returns the model it received unchanged, so a round is only what
Flower does to send the global model, bring back K models and average them.

A round is clocked on the server from the moment ``configure_fit`` has picked the K clients
(so the wait for clients to connect before round 1 is not counted) to the end of
``aggregate_fit`` (the new global model serialised, ready to go out).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

warnings.filterwarnings("ignore")  # the legacy API warns on every call that it is deprecated


def arrays(shapes: list[list[int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(shape, dtype=np.float32) * 0.02) for shape in shapes]


def serve(address: str, clients: int, rounds: int, shapes: list[list[int]], out: Path) -> None:
    import flwr as fl
    from flwr.server.strategy import FedAvg

    started: dict[int, float] = {}
    finished: dict[int, float] = {}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            chosen = super().configure_fit(server_round, parameters, client_manager)
            started[server_round] = time.perf_counter()
            return chosen

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            aggregated = super().aggregate_fit(server_round, results, failures)
            finished[server_round] = time.perf_counter()
            write()  # after every round: a run killed later still leaves the rounds it finished
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client(s) failed")
            return aggregated

    def write() -> None:
        out.write_text(
            json.dumps(
                {
                    "round_seconds": [finished[r] - started[r] for r in sorted(finished)],
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "flwr": fl.__version__,
                }
            )
        )

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=fl.common.ndarrays_to_parameters(arrays(shapes)),
    )
    fl.server.start_server(
        server_address=address,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    write()


def client(address: str) -> None:
    import flwr as fl

    class EchoClient(fl.client.NumPyClient):
        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            return parameters, 4, {}  # "trained" on 4 examples; the model goes back as it came

    fl.client.start_client(server_address=address, client=EchoClient().to_client(), insecure=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["server", "client"], required=True)
    parser.add_argument("--address", required=True, help="HOST:PORT of the server")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", type=Path, help="JSON list of tensor shapes (server)")
    parser.add_argument("--out", type=Path, help="where the server writes its timings (JSON)")
    args = parser.parse_args()
    if args.role == "server":
        serve(args.address, args.clients, args.rounds, json.loads(args.shapes.read_text()), args.out)
    else:
        client(args.address)


if __name__ == "__main__":
    main()
