"""Why the TLS star uses Python's ``ssl`` rather than gRPC: one model's bytes, silo to aggregator.

    .venv/bin/python benchmarks/transport_choice.py [--mb 87] [--reps 5]   # needs grpcio

Both sides run in two processes on loopback with the same certificates (TLS 1.3, mutual):
- ssl: fedsilo.star's Channel, one frame of the whole buffer, read into a preallocated tensor;
- grpc: a client-streaming call of 1 MiB messages (gRPC's default limit is 4 MiB a message),
  received into a preallocated tensor as they arrive: the same streaming sum the star does.
Prints seconds per transfer (median of ``--reps``) and the throughput, side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

CHUNK = 1 << 20


def pki() -> Path:
    from fedsilo import certs

    directory = Path(tempfile.mkdtemp(prefix="fedsilo-choice-"))
    ca_cert, ca_key = certs.init_ca(directory)
    certs.issue(directory, ca_cert, ca_key, "aggregator", hosts=["127.0.0.1"])
    certs.issue(directory, ca_cert, ca_key, "silo", 1)
    return directory


def ssl_receiver(directory: Path, port: int, numel: int, reps: int, out: mp.Queue) -> None:
    from fedsilo import certs, star

    server = socket.create_server(("127.0.0.1", port))
    context = certs.server_context(directory / "aggregator.pem", directory / "aggregator.key", directory / "ca.pem")
    conn, _ = server.accept()
    channel = star.Channel(context.wrap_socket(conn, server_side=True), 1)
    into = torch.empty(numel)
    times = []
    for _ in range(reps):
        channel.recv_exactly(star.Kind.TENSOR, star.bytes_of(into))  # the sender starts timing at its send
        times.append(time.perf_counter())
        channel.send(star.Kind.ROWS, b"ok")
    out.put(times)


def ssl_sender(directory: Path, port: int, numel: int, reps: int) -> list[float]:
    from fedsilo import certs, star

    context = certs.client_context(directory / "silo-1.pem", directory / "silo-1.key", directory / "ca.pem")
    for _ in range(100):
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.05)
    channel = star.Channel(context.wrap_socket(sock, server_hostname="127.0.0.1"), 0)
    data, seconds = torch.randn(numel), []
    for _ in range(reps):
        started = time.perf_counter()
        channel.send(star.Kind.TENSOR, star.bytes_of(data))
        channel.expect(star.Kind.ROWS)
        channel._fill(memoryview(bytearray(2)))
        seconds.append(time.perf_counter() - started)
    return seconds


def grpc_receiver(directory: Path, port: int, numel: int, reps: int, out: mp.Queue) -> None:
    from concurrent import futures

    import grpc

    into = torch.empty(numel)
    view = into.view(torch.uint8).numpy()

    def upload(requests, context):  # type: ignore[no-untyped-def]
        at = 0
        for message in requests:
            view[at : at + len(message)] = memoryview(message)
            at += len(message)
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "fedsilo.Bench", {"Upload": grpc.stream_unary_rpc_method_handler(upload)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    credentials = grpc.ssl_server_credentials(
        [((directory / "aggregator.key").read_bytes(), (directory / "aggregator.pem").read_bytes())],
        root_certificates=(directory / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    server.wait_for_termination(timeout=600)


def grpc_sender(directory: Path, port: int, numel: int, reps: int) -> list[float]:
    import grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=(directory / "ca.pem").read_bytes(),
        private_key=(directory / "silo-1.key").read_bytes(),
        certificate_chain=(directory / "silo-1.pem").read_bytes(),
    )
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials)
    grpc.channel_ready_future(channel).result(timeout=60)
    upload = channel.stream_unary("/fedsilo.Bench/Upload")
    data = torch.randn(numel).view(torch.uint8).numpy()
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        upload(bytes(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK))
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(kind: str, directory: Path, numel: int, reps: int) -> list[float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out: mp.Queue = mp.Queue()
    receiver = mp.Process(
        target=ssl_receiver if kind == "ssl" else grpc_receiver, args=(directory, port, numel, reps, out), daemon=True
    )
    receiver.start()
    time.sleep(0.5)
    seconds = (ssl_sender if kind == "ssl" else grpc_sender)(directory, port, numel, reps)
    receiver.terminate()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=87.0, help="megabytes per transfer (22M fp32 model: 87)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    directory, numel = pki(), int(args.mb * 1e6 / 4)
    results = {}
    for kind in ("ssl", "grpc", "ssl", "grpc"):  # ABAB: load drift falls on both
        results.setdefault(kind, []).extend(measure(kind, directory, numel, args.reps))
    print("| transport | s per transfer (median) | GB/s |\n|---|---|---|")
    for kind, seconds in results.items():
        median = statistics.median(seconds)
        print(f"| {kind} | {median:.3f} | {numel * 4 / median / 1e9:.2f} |")
    print(f"\ngrpc / ssl: {statistics.median(results['grpc']) / statistics.median(results['ssl']):.2f}x")


if __name__ == "__main__":
    main()
