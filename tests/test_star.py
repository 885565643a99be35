"""fedsilo.star in one process: real TLS 1.3 on loopback, the aggregator's listener and K silo
links in threads. The operations the round loops use, a lost silo, and what a listener refuses."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo import certs, star
from fedsilo.errors import FederationError, FedsiloError
from fedsilo.join import Welcome

HELLO = {"settings": {}, "labels": ["a", "b"], "architecture": "x", "train_examples": 3, "eval_examples": 0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the aggregator's certificate for 127.0.0.1, and silos 1..3."""
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = certs.init_ca(directory)
    certs.issue(directory, ca_cert, ca_key, "aggregator", hosts=["127.0.0.1"])
    for rank in (1, 2, 3):
        certs.issue(directory, ca_cert, ca_key, "silo", rank)
    return directory


def listener(pki: Path, silos: int, lines: list[str]) -> star.StarListener:
    context = certs.server_context(pki / "aggregator.pem", pki / "aggregator.key", pki / "ca.pem")
    authority = certs.load_certificate(pki / "ca.pem")

    def identify(connection: Any) -> int:
        return certs.check_peer(certs.peer_certificate(connection), authority, role="silo")

    return star.StarListener(("127.0.0.1", 0), context, identify, silos, lines.append)


def link(pki: Path, port: int, cert_rank: int, claimed_rank: int | None = None) -> star.StarLink:
    context = certs.client_context(pki / f"silo-{cert_rank}.pem", pki / f"silo-{cert_rank}.key", pki / "ca.pem")
    return star.StarLink(star.dial(("127.0.0.1", port), context, "127.0.0.1", 10), claimed_rank or cert_rank)


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own thread; their results (or the exception each raised), in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # returned for the test to look at
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.fixture
def formed(pki: Path) -> Iterator[tuple[star.StarGroup, list[star.StarLink], list[str]]]:
    """An aggregator and three admitted silos, group formed."""
    lines: list[str] = []
    door = listener(pki, 3, lines)
    links = [link(pki, door.address[1], rank) for rank in (1, 2, 3)]

    def admit() -> None:
        for hello in door.admit_silos(10).values():
            door.welcome(hello, Welcome(["a", "b"], 1, False, 2))

    asked = in_threads(*[lambda s=s: s.request_admission(HELLO, 10) for s in links], admit)
    assert all(isinstance(w, Welcome) for w in asked[:3]), asked
    # Round timeouts far above anything the tests wait: a failure they see is not a timeout's.
    group = door.form_group(600)
    for s in links:
        s.form_group(4, 600)
    yield group, links, lines
    group.close()
    for s in links:
        s.close()


def test_broadcast_reduce_and_rows_move_what_the_collectives_would(formed) -> None:
    # Prepare: a model and one update per silo, in bf16 as --transfer-dtype bfloat16 sends them;
    # longer than one chunk, so the running sum is built from pieces
    group, links, _ = formed
    n = star.CHUNK_BYTES // 2 + 1000
    model = torch.randn(n)
    updates = [torch.randn(n).to(torch.bfloat16) for _ in links]
    received = [torch.empty(n) for _ in links]
    summed = torch.zeros(n, dtype=torch.bfloat16)
    # Execute: the model down, the updates up, a report row from everyone
    in_threads(
        lambda: group.broadcast_(model),
        *[lambda s=s, r=r: s.broadcast_(r) for s, r in zip(links, received, strict=False)],
    )
    in_threads(
        lambda: group.reduce_sum_(summed),
        *[lambda s=s, u=u: s.reduce_sum_(u) for s, u in zip(links, updates, strict=False)],
    )
    rows = in_threads(
        lambda: group.gather_rows(torch.zeros(2)),
        *[lambda s=s: s.gather_rows(torch.tensor([float(s.rank), 10.0 * s.rank])) for s in links],
    )
    # Assert: everyone has the model bit for bit; the sum is the updates' (bf16 additions in
    # another order: within bf16's rounding of the total); every rank holds every row
    assert all(torch.equal(r, model) for r in received)
    exact = torch.stack([u.float() for u in updates]).sum(0)
    assert torch.allclose(summed.float(), exact, rtol=2e-2, atol=2e-2)
    expected = torch.tensor([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], dtype=torch.float64)
    assert all(torch.equal(r, expected) for r in rows)


def test_a_lost_silo_is_named_at_once_and_the_others_hear_why(formed) -> None:
    group, links, _ = formed
    links[1].close()  # silo 2's process dies: its connection closes
    started = time.monotonic()
    with pytest.raises(FederationError, match=r"lost silo 2 during round 3: local training"):
        with group.phase("round 3: local training"):
            group.gather_rows(torch.zeros(2))
    assert time.monotonic() - started < 300  # named by the closed connection, not by the 600 s timeout
    # silos 1 and 3 were waiting on the same gather: they read the aggregator's reason
    for silo in (links[0], links[2]):
        with pytest.raises(FederationError, match="the aggregator stopped the federation: lost silo 2"):
            with silo.phase("round 3: reporting"):
                silo.gather_rows(torch.zeros(2))


def test_a_certificate_for_one_rank_cannot_join_as_another(pki) -> None:
    lines: list[str] = []
    door = listener(pki, 3, lines)
    impostor = link(pki, door.address[1], cert_rank=2, claimed_rank=3)
    with pytest.raises(FedsiloError, match="the aggregator refused silo 3: its certificate binds rank 2, not 3"):
        impostor.request_admission(HELLO, 10)
    assert any("refused a connection from 127.0.0.1" in line and "binds rank 2, not 3" in line for line in lines)
    door.close()


def test_strangers_on_the_port_are_refused_in_a_line_and_do_not_hold_it(pki, monkeypatch) -> None:
    # Prepare: a short greeting window, so the stalled connection is given up on quickly
    monkeypatch.setattr(star, "GREETING_SECONDS", 1.0)
    lines: list[str] = []
    door = listener(pki, 1, lines)
    port = door.address[1]
    # Execute: a port scanner, a stalled (half-open) client, a plain-TCP and an HTTP client, then the real silo
    scanner = socket.create_connection(("127.0.0.1", port))
    scanner.close()
    stalled = socket.create_connection(("127.0.0.1", port))
    for probe in (b"hello aggregator\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port)) as plain:
            plain.sendall(probe)
            plain.settimeout(5)
            with contextlib.suppress(OSError):  # an alert, or the connection closed: either is fine
                plain.recv(100)
    real = link(pki, port, 1)
    asked = in_threads(lambda: real.request_admission(HELLO, 10), lambda: door.admit_silos(10))
    # Assert: the real silo got in; each stranger got its own line; nothing hung
    assert set(asked[1]) == {1}
    deadline = time.monotonic() + 10
    while sum("refused a connection" in line for line in lines) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = [line for line in lines if "refused a connection" in line]
    assert len(refused) == 4, lines
    assert any("nothing was said within 1s" in line for line in refused), refused
    assert any("http request" in line for line in refused), refused
    stalled.close()
    real.close()
    door.close()
