"""--transport tls with real processes: the same model as torch.distributed, nothing listening on a
silo, only TLS records on the wire, and every bad certificate refused in one line on both sides."""

from __future__ import annotations

import datetime as dt
import socket
import struct
import threading
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from fedsilo import certs
from fedsilo.errors import EX_CONFIG
from fedsilo.launcher import free_port
from tests.procs import assert_one_line_error, final_weights, finish, run, start, watch
from tests.tiny import sentiment_rows, write_csv

# Labels and a data file name long enough that finding them in ciphertext by chance is impossible.
LABELS = ("unmistakably-negative-review", "unmistakably-positive-review")
COMMON = ["--batch-size", "16", "--lr", "0.3", "--local-epochs", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = certs.init_ca(directory)
    certs.issue(directory, ca_cert, ca_key, "aggregator", hosts=["127.0.0.1"])
    for rank in (1, 2):
        certs.issue(directory, ca_cert, ca_key, "silo", rank)
    return directory


def identity(pki: Path, name: str) -> list[str]:
    return [
        "--tls-cert",
        str(pki / f"{name}.pem"),
        "--tls-key",
        str(pki / f"{name}.key"),
        "--tls-ca",
        str(pki / "ca.pem"),
    ]


class Relay:
    """A TCP relay between silos and the aggregator that keeps every byte it forwards, as an
    eavesdropper on the path would see them."""

    def __init__(self, target: int) -> None:
        self.target, self.server = target, socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.streams: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.server.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                self.streams.append(bytearray())
                threading.Thread(target=self._pump, args=(a, b, self.streams[-1]), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, kept: bytearray) -> None:
        while data := _recv(source):
            kept += data
            try:
                sink.sendall(data)
            except OSError:
                return
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except OSError:
        return b""


def tls_records(stream: bytes) -> list[int]:
    """The content types of the TLS records that make up ``stream``; fails on anything else."""
    types, at = [], 0
    while at < len(stream):
        kind, version, length = struct.unpack("!BHH", stream[at : at + 5])
        assert kind in (20, 21, 22, 23) and version in (0x0301, 0x0303) and length <= 2**14 + 256, (
            f"not a TLS record at byte {at}: {stream[at : at + 16]!r}"
        )
        types.append(kind)
        at += 5 + length
    assert at == len(stream), "the stream ends inside a record"
    return types


def test_over_tls_the_federation_ends_with_the_collective_model_and_nothing_leaks(
    tmp_path, tiny_bert, pki, reaper
) -> None:
    # Prepare: data whose label names would show if anything travelled in clear
    data = write_csv(tmp_path / "confidential-ward-notes.csv", sentiment_rows(240, labels=LABELS))
    shared = ["--silos", "2", "--rounds", "2", "--model", str(tiny_bert), "--dataset", str(data), *COMMON]
    port = free_port()
    relay = Relay(port)
    tls = ["--transport", "tls", "--checkpoint-dir", "ckpt"]
    # Execute: the aggregator listens on its port; the silos dial it through the relay
    (tmp_path / "agg").mkdir()
    aggregator = watch(
        "aggregator",
        *shared,
        *tls,
        *identity(pki, "aggregator"),
        "--aggregator",
        f"127.0.0.1:{port}",
        cwd=tmp_path / "agg",
    )
    silos = [
        watch(
            "silo",
            "--rank",
            str(r),
            *shared,
            *tls,
            *identity(pki, f"silo-{r}"),
            "--aggregator",
            f"127.0.0.1:{relay.port}",
            "--tls-server-name",
            "127.0.0.1",
            cwd=tmp_path,
        )
        for r in (1, 2)
    ]
    reaper.extend([aggregator, *silos])
    listening: set[str] = set()
    aggregator.wait_for("round 1/2")
    for silo in silos:  # mid-federation: what sockets does a silo hold?
        if silo.process.poll() is None:
            conns = psutil.Process(silo.process.pid).net_connections(kind="inet")
            listening |= {f"{c.laddr}" for c in conns if c.status == psutil.CONN_LISTEN}
    results = [p.result() for p in (aggregator, *silos)]
    assert all(code == 0 for code, _ in results), results
    # ... and the same federation over torch.distributed
    (tmp_path / "collective").mkdir()
    collective = run("run", *shared, "--checkpoint-dir", "ckpt", cwd=tmp_path / "collective")
    assert collective.returncode == 0, collective.stdout + collective.stderr

    # Assert: the same model; nothing listened on a silo
    over_tls, over_gloo = final_weights(tmp_path / "agg" / "ckpt"), final_weights(tmp_path / "collective" / "ckpt")
    assert (over_tls - over_gloo).abs().max() <= 1e-6
    assert listening == set()
    # the relay saw TLS records and nothing else: no label, file name, setting or model in clear
    assert len(relay.streams) == 4 and all(relay.streams)
    for stream in relay.streams:
        assert 23 in tls_records(bytes(stream))  # application data, encrypted
        for secret in (*LABELS, "confidential-ward-notes", "local_epochs"):
            assert secret.encode() not in stream


@pytest.mark.slow  # 75 s: every refusal over real TLS; the default run keeps the TLS federation tests
def test_every_bad_certificate_is_one_line_on_both_sides_and_the_real_silo_still_joins(
    tmp_path, tiny_bert, sentiment_csv, pki, reaper
) -> None:
    # Prepare: certificates that must not get in: another federation's, an expired one, a revoked one
    other = tmp_path / "other"
    other.mkdir()
    other_ca, other_key = certs.init_ca(other)
    certs.issue(other, other_ca, other_key, "silo", 1)
    old = tmp_path / "old"
    old.mkdir()
    certs.issue(
        old,
        pki / "ca.pem",
        pki / "ca.key",
        "silo",
        1,
        days=1,
        not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3),
    )
    revoked = tmp_path / "revoked"
    revoked.mkdir()
    _, revoked_cert = certs.issue(revoked, pki / "ca.pem", pki / "ca.key", "silo", 1)
    serial = certs.load_certificate(revoked_cert).serial_number
    (tmp_path / "revoked.txt").write_text(f"# revoked by the operator\n{hex(serial)}\n")
    port = free_port()
    shared = [
        "--silos",
        "1",
        "--rounds",
        "1",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--transport",
        "tls",
        "--aggregator",
        f"127.0.0.1:{port}",
        *COMMON,
    ]
    aggregator = watch(
        "aggregator",
        *shared,
        *identity(pki, "aggregator"),
        "--tls-revoked",
        str(tmp_path / "revoked.txt"),
        cwd=tmp_path,
    )
    reaper.append(aggregator)
    aggregator.wait_for("waiting for 1 silo(s)")

    def silo(*flags: str) -> tuple[int, str]:
        return finish(start("silo", "--rank", "1", *shared, *flags, cwd=tmp_path), timeout=120)

    # Execute: each impostor in turn, then the real silo 1
    cases = {
        "other CA": (
            silo(
                "--tls-cert",
                str(other / "silo-1.pem"),
                "--tls-key",
                str(other / "silo-1.key"),
                "--tls-ca",
                str(pki / "ca.pem"),
            ),
            "unknown ca",
        ),
        "expired": (
            silo(
                "--tls-cert",
                str(old / "silo-1.pem"),
                "--tls-key",
                str(old / "silo-1.key"),
                "--tls-ca",
                str(pki / "ca.pem"),
            ),
            "certificate expired",
        ),
        "revoked": (
            silo(
                "--tls-cert",
                str(revoked_cert),
                "--tls-key",
                str(revoked / "silo-1.key"),
                "--tls-ca",
                str(pki / "ca.pem"),
            ),
            f"certificate serial {hex(serial)} is revoked",
        ),
        "wrong rank": (silo(*identity(pki, "silo-2")), "binds rank 2, not 1"),
        "wrong server name": (
            silo(*identity(pki, "silo-1"), "--tls-server-name", "aggregator.example.org"),
            "aggregator.example.org",
        ),
    }
    plain = socket.create_connection(("127.0.0.1", port))
    plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    plain.close()
    real = silo(*identity(pki, "silo-1"))
    code, out = aggregator.result()

    # Assert: each impostor exited with its one line; the aggregator said one line per refusal, went
    # on, and the real silo's federation finished; MLflow holds that one run only
    for name, ((silo_code, silo_out), expected) in cases.items():
        assert silo_code == EX_CONFIG, (name, silo_code, silo_out)  # no restart can fix a certificate
        assert_one_line_error(silo_out, expected)
    assert real[0] == 0, real[1]
    assert code == 0, out
    refusals = [line for line in out.splitlines() if "refused a connection" in line]
    # one line each, in the order they came: the wrong-rank silo stopped itself before dialling;
    # the silo that found the wrong name on the aggregator's certificate hung up on it
    expected_lines = [
        "unable to get local issuer certificate",
        "certificate has expired",
        f"{hex(serial)} is revoked",
        "alert bad certificate",
        "http request",
    ]
    assert len(refusals) == len(expected_lines), out
    assert all(said in line for said, line in zip(expected_lines, refusals, strict=False)), refusals
    assert "Traceback" not in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert len(client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])) == 1
    assert len(list((tmp_path / "checkpoints").glob("*/latest.pt"))) == 1


def test_fedsilo_run_makes_throwaway_certificates(tmp_path, tiny_bert, sentiment_csv) -> None:
    result = run(
        "run",
        "--silos",
        "2",
        "--rounds",
        "1",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--transport",
        "tls",
        *COMMON,
        "--checkpoint-dir",
        "ckpt",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS 1.3" in result.stdout
    assert torch.is_tensor(final_weights(tmp_path / "ckpt"))


@pytest.mark.parametrize("role", ["aggregator", "silo"])
def test_missing_certificates_are_one_line_before_anything_loads(tmp_path, role, pki) -> None:
    # A model and dataset that do not exist: the certificate check must come before they are read
    rank = ["--rank", "1"] if role == "silo" else []
    missing = run(role, *rank, "--transport", "tls", "--model", "no-such-model", "--dataset", "none.csv", cwd=tmp_path)
    unreadable = run(
        role,
        *rank,
        "--transport",
        "tls",
        "--model",
        "no-such-model",
        "--dataset",
        "none.csv",
        *identity(pki, "aggregator" if role == "aggregator" else "silo-1")[:4],
        "--tls-ca",
        str(tmp_path / "gone.pem"),
        cwd=tmp_path,
    )
    assert missing.returncode == EX_CONFIG and unreadable.returncode == EX_CONFIG
    assert_one_line_error(missing.stderr, "--transport tls needs --tls-cert, --tls-key, --tls-ca")
    assert_one_line_error(unreadable.stderr, f"--tls-ca {tmp_path / 'gone.pem'}: no such file")
    assert "no-such-model" not in missing.stderr + unreadable.stderr
