"""Which transport a federation uses, chosen here and nowhere else.

- ``collective`` (the default, one cluster): torch.distributed with NCCL or gloo, joined over
  its TCPStore with the token handshake of :mod:`fedsilo.join`. Every rank connects to every
  other on ephemeral ports, in clear text: the fast path inside one network.
- ``tls`` (across organisations): the star of :mod:`fedsilo.star`. Each silo dials out to the
  aggregator's one port with TLS 1.3 and its own certificate, which is its identity.

Both give the aggregator a :class:`Listener` and a silo a :class:`Link`: admit or ask to be
admitted with the same hello and verdict, then form the group the round loops use
(:class:`fedsilo.comm.Transport`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fedsilo import certs, comm, join, star
from fedsilo.config import Settings
from fedsilo.errors import ConfigError
from fedsilo.join import Hello, Welcome
from fedsilo.progress import Log


class Listener(Protocol):
    """The aggregator's door: admit K silos, answer each, then form the group."""

    def admit_silos(self, timeout: float) -> dict[int, Hello]: ...
    def refuse(self, hello: Hello, reason: str, *, retryable: bool = False) -> None: ...
    def welcome(self, hello: Hello, body: Welcome) -> None: ...
    def form_group(self, round_timeout: float) -> comm.Transport: ...


class Link(Protocol):
    """A silo's way in: say hello, get the verdict, then join the group."""

    def request_admission(self, hello_fields: dict[str, Any], timeout: float) -> Welcome: ...
    def form_group(self, world_size: int, round_timeout: float) -> comm.Transport: ...


@dataclass
class StoreListener:
    """``collective``: the token handshake on the aggregator's TCPStore, then a torch.distributed group."""

    store: Any
    token: str | None
    silos: int
    backend: str
    device: torch.device
    address: tuple[str, int]
    log: Log

    def admit_silos(self, timeout: float) -> dict[int, Hello]:
        return join.admit_silos(self.store, self.silos, self.token, timeout, self.log)

    def refuse(self, hello: Hello, reason: str, *, retryable: bool = False) -> None:
        join.refuse(self.store, hello, reason, retryable=retryable)

    def welcome(self, hello: Hello, body: Welcome) -> None:
        join.welcome(self.store, hello, self.token, body)

    def form_group(self, round_timeout: float) -> comm.Transport:
        return comm.form_group(self.store, 0, self.silos + 1, self.backend, self.device, round_timeout, self.address)


@dataclass
class StoreLink:
    """``collective``, a silo's side."""

    store: Any
    rank: int
    token: str | None
    backend: str
    device: torch.device
    address: tuple[str, int]

    def request_admission(self, hello_fields: dict[str, Any], timeout: float) -> Welcome:
        return join.request_admission(self.store, self.rank, self.token, hello_fields)

    def form_group(self, world_size: int, round_timeout: float) -> comm.Transport:
        return comm.form_group(
            self.store, self.rank, world_size, self.backend, self.device, round_timeout, self.address
        )


def tls_files(settings: Settings) -> tuple[Path, Path, Path]:
    """This rank's certificate, key and CA for --transport tls; each must be given and readable."""
    fed = settings.federation
    missing = [
        flag
        for flag, value in (("--tls-cert", fed.tls_cert), ("--tls-key", fed.tls_key), ("--tls-ca", fed.tls_ca))
        if value is None
    ]
    if missing:
        raise ConfigError(f"--transport tls needs {', '.join(missing)} (see `fedsilo certs --help`)")
    assert fed.tls_cert and fed.tls_key and fed.tls_ca
    for flag, path in (("--tls-cert", fed.tls_cert), ("--tls-key", fed.tls_key), ("--tls-ca", fed.tls_ca)):
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    return fed.tls_cert, fed.tls_key, fed.tls_ca


def check(settings: Settings) -> None:
    """What the chosen transport needs from this rank's settings, checked before the slow start-up
    (data, tokenizer, model): a missing certificate is found in a second, not after minutes."""
    if settings.federation.transport == "tls":
        tls_files(settings)


def describe(settings: Settings, device: torch.device) -> str:
    """What the aggregator's waiting line says about the wire."""
    if settings.federation.transport == "tls":
        return "TLS 1.3, mutual certificates"
    return comm.pick_backend(settings.federation.backend, device)


def listen(settings: Settings, token: str | None, device: torch.device, log: Log) -> Listener:
    """The aggregator's door on ``--aggregator HOST:PORT``."""
    fed = settings.federation
    address = comm.resolve_address(fed.aggregator)
    if fed.transport == "tls":
        cert, key, ca = tls_files(settings)
        context = certs.server_context(cert, key, ca)
        revoked = certs.load_revoked(fed.tls_revoked) if fed.tls_revoked else frozenset()
        authority = certs.load_certificate(ca, "CA certificate")

        def identify(connection: ssl.SSLSocket) -> int:
            return certs.check_peer(certs.peer_certificate(connection), authority, revoked, role="silo")

        return star.StarListener(address, context, identify, fed.silos, log)
    backend = comm.pick_backend(fed.backend, device)
    store = comm.open_store(0, address[0], address[1], fed.join_timeout)
    return StoreListener(store, token, fed.silos, backend, device, address, log)


def dial(settings: Settings, rank: int, token: str | None, device: torch.device) -> Link:
    """A silo's way to the aggregator."""
    fed = settings.federation
    address = comm.resolve_address(fed.aggregator)
    if fed.transport == "tls":
        cert, key, ca = tls_files(settings)
        mine = certs.load_certificate(cert)
        if certs.rank_of(mine) != rank:  # fail here, with the reason, rather than be refused there
            raise ConfigError(f"certificate {cert} binds rank {certs.rank_of(mine)}, not {rank}")
        context = certs.client_context(cert, key, ca)
        server_name = fed.tls_server_name or address[0]
        connection = star.dial(address, context, server_name, fed.join_timeout)
        # OpenSSL checked the chain and the name; that it is the aggregator's certificate, not another
        # member's that happens to carry the name, is checked here.
        certs.check_peer(
            certs.peer_certificate(connection), certs.load_certificate(ca, "CA certificate"), role="aggregator"
        )
        return star.StarLink(connection, rank)
    backend = comm.pick_backend(fed.backend, device)
    store = comm.open_store(rank, address[0], address[1], fed.join_timeout)
    return StoreLink(store, rank, token, backend, device, address)
