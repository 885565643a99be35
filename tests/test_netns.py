"""A silo on a network of its own that leads to the aggregator's one TLS port and nowhere else: the
hospital's firewall, built from Linux network namespaces. Skipped, with the reason, where the test
may not make namespaces (not root, no ``ip``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsilo import certs
from tests.procs import Watched, command, environment, final_weights
from tests.test_tls import COMMON, identity

PORT = 29400  # any: the aggregator's namespace is new, nothing else listens in it


@dataclass(frozen=True)
class Site:
    """Two namespaces joined by one veth pair: ``aggregator`` (its end: ``aggregator_ip``) and
    ``hospital`` (its end: ``hospital_ip``), each with its own loopback and no other interface, so
    no route leads from the hospital to the host or anywhere else."""

    aggregator: str
    hospital: str
    aggregator_ip: str
    hospital_ip: str


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def inside(namespace: str, *command: str) -> subprocess.CompletedProcess[str]:
    return ip("netns", "exec", namespace, *command)


@pytest.fixture
def site() -> Iterator[Site]:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (iproute2) to make network namespaces")
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.213.{os.getpid() % 250}"
    found = Site(f"fsagg{tag}", f"fshosp{tag}", f"{subnet}.1", f"{subnet}.2")
    made = ip("netns", "add", found.aggregator)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    try:
        steps = [
            ("netns", "add", found.hospital),
            ("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vh{tag}"),
            ("link", "set", f"va{tag}", "netns", found.aggregator),
            ("link", "set", f"vh{tag}", "netns", found.hospital),
            ("-n", found.aggregator, "addr", "add", f"{found.aggregator_ip}/30", "dev", f"va{tag}"),
            ("-n", found.hospital, "addr", "add", f"{found.hospital_ip}/30", "dev", f"vh{tag}"),
            ("-n", found.aggregator, "link", "set", "lo", "up"),
            ("-n", found.hospital, "link", "set", "lo", "up"),
            ("-n", found.aggregator, "link", "set", f"va{tag}", "up"),
            ("-n", found.hospital, "link", "set", f"vh{tag}", "up"),
        ]
        for step in steps:
            done = ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot wire the namespaces (ip {' '.join(step)}): {done.stderr.strip()}")
        yield found
    finally:
        for namespace in (found.aggregator, found.hospital):
            ip("netns", "del", namespace)  # takes its end of the veth pair with it


def listening_ports(namespace: str) -> set[int]:
    """TCP ports listening on any address other than loopback in ``namespace``."""
    out = inside(namespace, "ss", "-Hltn").stdout
    ports = set()
    for line in out.splitlines():
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        if not host.startswith(("127.", "[::1]")):
            ports.add(int(port))
    return ports


def connect_from(namespace: str, host: str, port: int) -> str:
    """What a TCP connect from ``namespace`` to host:port gives: "connected" or the error's type."""
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout=3).close(); print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    return inside(namespace, sys.executable, "-c", probe).stdout.strip()


def watch_in(namespace: str, *args: str, cwd: Path) -> Watched:
    """``watch``, with the process inside ``namespace``."""
    return Watched(
        subprocess.Popen(
            ["ip", "netns", "exec", namespace, *command(*args)],
            cwd=cwd,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    )


def test_a_silo_that_can_reach_only_the_aggregators_port_completes_a_federation(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, site: Site, reaper: list[Watched]
) -> None:
    # Prepare: a PKI whose aggregator certificate names the address the hospital dials
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_cert, ca_key = certs.init_ca(pki)
    certs.issue(pki, ca_cert, ca_key, "aggregator", hosts=[site.aggregator_ip])
    for rank in (1, 2):
        certs.issue(pki, ca_cert, ca_key, "silo", rank)
    address = f"{site.aggregator_ip}:{PORT}"
    shared = [
        "--silos", "2", "--rounds", "1", "--model", str(tiny_bert), "--dataset", str(sentiment_csv),
        "--transport", "tls", "--aggregator", address, *COMMON,
    ]  # fmt: skip

    # Execute: the aggregator and silo 1 in the aggregator's namespace, silo 2 in the hospital's
    aggregator = watch_in(site.aggregator, "aggregator", *shared, *identity(pki, "aggregator"), cwd=tmp_path)
    reaper.append(aggregator)
    aggregator.wait_for("waiting for 2 silo(s)")
    open_ports = listening_ports(site.aggregator)
    # what the hospital can reach: the aggregator's port; no other port there, no host, no internet
    reach = {
        "aggregator port": connect_from(site.hospital, site.aggregator_ip, PORT),
        "another port on the aggregator": connect_from(site.hospital, site.aggregator_ip, PORT + 1),
        "the host": connect_from(site.hospital, "10.0.0.1", 443),
    }
    silos = [
        watch_in(namespace, "silo", "--rank", str(rank), *shared, *identity(pki, f"silo-{rank}"), cwd=tmp_path)
        for rank, namespace in ((1, site.aggregator), (2, site.hospital))
    ]
    reaper.extend(silos)
    results = [p.result() for p in (aggregator, *silos)]

    # Assert: the federation completed with the hospital's silo in it, through the one open port
    assert all(code == 0 for code, _ in results), results
    assert open_ports == {PORT}
    assert reach == {
        "aggregator port": "connected",
        "another port on the aggregator": "ConnectionRefusedError",
        "the host": "OSError",  # Network is unreachable: there is no route out
    }
    assert "silo 2 joined" in results[0][1]
    assert final_weights(tmp_path / "checkpoints").isfinite().all()
