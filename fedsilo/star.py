"""The cross-site transport: a star of mutually authenticated TLS 1.3 connections.

The aggregator listens on one TCP port and each silo dials out to it: nothing listens on a silo,
silos never reach each other, and every byte after the TCP handshake is inside TLS. The
certificate is the identity: a silo's binds its rank (:mod:`fedsilo.certs`), which is checked
after the handshake and against the rank its hello claims.

The round loops see the operations of :class:`fedsilo.comm.Group`: ``broadcast_``,
``reduce_sum_``, ``gather_rows``, ``announce_abort``, ``phase`` and ``close``. Per round the
aggregator sends the global model to every silo at once (a thread each) and adds each silo's
update into one running sum chunk by chunk as it arrives, so beyond the sum it holds one chunk
per silo, never a model per silo.

Every message is a frame: kind (1 byte), length (8 bytes, big-endian), payload.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch

from fedsilo.errors import FederationError, FedsiloError, JoinRefused, first_line
from fedsilo.join import Hello, Welcome
from fedsilo.progress import Log

HEADER = struct.Struct("!BQ")
# What one silo's update is read in: 1 MiB, so K silos arriving at once hold K chunks, not K models.
CHUNK_BYTES = 1 << 20
# A connection must finish its TLS handshake and hello within this long: a port scanner or a
# half-open connection then costs one thread for seconds, never the federation.
GREETING_SECONDS = 10.0
# TCP keepalive: a silo whose host vanished without closing (power, network) is found in about
# KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL seconds instead of at the round timeout.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3
# Largest JSON message (a hello with settings and labels) a peer may send before it is admitted.
MAX_JSON_BYTES = 1 << 20


class Kind(enum.IntEnum):
    IDENTIFIED = 0  # the aggregator accepted the silo's certificate: say hello
    HELLO = 1
    VERDICT = 2
    TENSOR = 3
    ROWS = 4
    ABORT = 5


# The reason a silo is turned away at the door after the group formed; a silo told this exits
# retryable (a restarted silo may meet the previous federation still running).
ALREADY_FORMED = "the federation has already formed"


class Aborted(Exception):
    """The aggregator stopped the federation; ``str()`` is its reason."""


class LinkLost(Exception):
    """The connection to ``rank`` broke (closed, reset, timed out, or spoke out of turn)."""

    def __init__(self, rank: int, reason: str) -> None:
        super().__init__(reason)
        self.rank, self.reason = rank, reason


def bytes_of(flat: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, writable and without a copy (bf16 included)."""
    return flat.view(torch.uint8).numpy().data.cast("B")


def keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Stopped(Exception):
    """A read was given up because another silo failed (see :meth:`Channel.stop_reading`)."""


class Channel:
    """One TLS connection speaking frames; ``rank`` is the peer's.

    The socket waits at most POLL_SECONDS at a time; reads and writes go on after such a pause
    until ``limit`` seconds pass without progress. So another thread can make a read give up
    (:meth:`stop_reading`) without touching the TLS session, which must stay whole to tell the
    peer why. (OpenSSL resumes a read or a write that timed out when it is called again with the
    same buffer.)
    """

    POLL_SECONDS = 0.25

    def __init__(self, sock: ssl.SSLSocket, rank: int, limit: float | None = None) -> None:
        self.sock, self.rank, self.limit = sock, rank, limit
        self._stop = threading.Event()
        sock.settimeout(self.POLL_SECONDS)

    def _pause(self, waited: float, what: str) -> float:
        """After a POLL_SECONDS pause with nothing moved: give up, or how long we have waited."""
        if self._stop.is_set():
            raise Stopped("another silo failed")
        waited += self.POLL_SECONDS
        if self.limit is not None and waited >= self.limit:
            raise TimeoutError(f"nothing was {what} within {self.limit:g}s")
        return waited

    def _send_all(self, data: bytes | memoryview) -> None:
        view, waited = memoryview(data).cast("B"), 0.0
        while len(view):
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                waited = self._pause(waited, "sent")
                continue
            view, waited = view[sent:], 0.0

    def send(self, kind: Kind, payload: bytes | memoryview = b"") -> None:
        self._send_all(HEADER.pack(kind, len(payload)))
        if len(payload):
            self._send_all(payload)

    def send_json(self, kind: Kind, body: dict[str, Any]) -> None:
        self.send(kind, json.dumps(body).encode())

    def _fill(self, view: memoryview) -> None:
        waited = 0.0
        while len(view):
            try:
                got = self.sock.recv_into(view)
            except TimeoutError:
                waited = self._pause(waited, "received")
                continue
            if not got:
                raise ConnectionError("the connection was closed")
            view, waited = view[got:], 0.0

    def expect(self, kind: Kind) -> int:
        """Read a frame header of ``kind`` and return its payload length; an ABORT raises Aborted."""
        header = bytearray(HEADER.size)
        self._fill(memoryview(header))
        got, length = HEADER.unpack(header)
        if got == Kind.ABORT:
            raise Aborted(self._read(min(length, MAX_JSON_BYTES)).decode(errors="replace"))
        if got != kind:
            raise ConnectionError(f"expected a {kind.name} message, got kind {got}")
        return int(length)

    def _read(self, length: int) -> bytes:
        data = bytearray(length)
        self._fill(memoryview(data))
        return bytes(data)

    def recv_json(self, kind: Kind) -> dict[str, Any]:
        length = self.expect(kind)
        if length > MAX_JSON_BYTES:
            raise ConnectionError(f"a {kind.name} message of {length} bytes is over the {MAX_JSON_BYTES} limit")
        body = json.loads(self._read(length))
        if not isinstance(body, dict):
            raise ConnectionError(f"a {kind.name} message must be a JSON object")
        return body

    def recv_exactly(self, kind: Kind, view: memoryview) -> None:
        """A frame whose payload fills ``view`` exactly (a tensor or rows of agreed size)."""
        length = self.expect(kind)
        if length != len(view):
            raise ConnectionError(f"expected {len(view)} bytes of {kind.name}, got {length}")
        self._fill(view)

    def stop_reading(self) -> None:
        """Make a thread reading this connection give up within POLL_SECONDS (it raises Stopped)."""
        self._stop.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the aggregator's side ----------------------------------------------------------------------


class StarListener:
    """The aggregator's port: TLS handshakes and hellos, each in its own thread, until the group forms.

    A connection that fails its handshake, holds a certificate that :func:`identify` refuses, or
    says nothing is logged in one line and closed; the listener goes on admitting the real silos.
    """

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        identify: Callable[[ssl.SSLSocket], int],
        silos: int,
        log: Log,
    ) -> None:
        """``identify`` maps a connection whose handshake passed to the rank its certificate binds, or
        raises FedsiloError (revoked, wrong role, no rank)."""
        self.context, self.identify, self.silos, self.log = context, identify, silos, log
        self.server = _listen(address, backlog=max(16, 2 * silos))
        self.address = self.server.getsockname()[:2]
        self.arrived: queue.Queue[tuple[Hello, Channel]] = queue.Queue()
        self.channels: dict[int, Channel] = {}
        self._formed = threading.Event()
        threading.Thread(target=self._accept, name="fedsilo-tls-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.server.accept()
            except OSError:  # closed: the federation ended
                return
            threading.Thread(target=self._greet, args=(conn, peer), name="fedsilo-tls-greet", daemon=True).start()

    def _greet(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        where = f"{peer[0]}:{peer[1]}"
        conn.settimeout(GREETING_SECONDS)  # for the handshake; the channel then counts its own
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError, timeouts and resets are OSErrors
            self.log(f"refused a connection from {where}: TLS handshake failed ({_reason(exc, GREETING_SECONDS)})")
            with contextlib.suppress(OSError):
                conn.close()
            return
        channel = Channel(tls, 0, GREETING_SECONDS)
        try:
            # Answer at once, before the silo says anything: a refusal then reaches it whole (an
            # ABORT frame, or OpenSSL's alert when the handshake failed on our side), never a reset.
            channel.rank = self.identify(tls)
            rank = channel.rank
            channel.send_json(Kind.IDENTIFIED, {"rank": rank})
            body = channel.recv_json(Kind.HELLO)
            if body.get("rank") != rank:
                raise JoinRefused(f"its certificate binds rank {rank}, not {body.get('rank')}")
            if self._formed.is_set():
                # A restarted silo can meet the previous federation still running: try again.
                raise JoinRefused(ALREADY_FORMED, retryable=True)
            keep_alive(tls)
            self.arrived.put((Hello(**{**body, "nonce": "", "proof": ""}), channel))
        except (FedsiloError, OSError, ValueError, TypeError, Aborted) as exc:
            self.log(f"refused a connection from {where}: {_reason(exc, GREETING_SECONDS)}")
            if isinstance(exc, FedsiloError):
                with contextlib.suppress(OSError):
                    channel.send(Kind.ABORT, str(exc).encode())
            channel.close()

    def admit_silos(self, timeout: float) -> dict[int, Hello]:
        """One hello per rank 1..K, or FederationError naming the missing ranks after ``timeout``."""
        deadline = time.monotonic() + timeout
        hellos: dict[int, Hello] = {}
        while len(hellos) < self.silos:
            try:
                hello, channel = self.arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                missing = ", ".join(str(r) for r in range(1, self.silos + 1) if r not in hellos)
                reason = f"silo(s) {missing} did not join within {timeout:g}s"
                for hello in hellos.values():
                    self.refuse(hello, reason, retryable=True)
                raise FederationError(reason) from None
            if not 1 <= hello.rank <= self.silos:
                self._turn_away(channel, f"rank {hello.rank} is outside 1..{self.silos}")
            elif hello.rank in hellos:
                self._turn_away(channel, f"rank {hello.rank} is already taken by another silo", retryable=True)
            else:
                hellos[hello.rank] = hello
                self.channels[hello.rank] = channel
                self.log(f"silo {hello.rank} joined ({hello.train_examples} training examples)")
        return hellos

    def _turn_away(self, channel: Channel, reason: str, *, retryable: bool = False) -> None:
        self.log(f"refused a process claiming silo {channel.rank}: {reason}")
        with contextlib.suppress(OSError):
            channel.send_json(Kind.VERDICT, {"ok": False, "reason": reason, "retryable": retryable})
        channel.close()

    def refuse(self, hello: Hello, reason: str, *, retryable: bool = False) -> None:
        channel = self.channels.pop(hello.rank)
        with contextlib.suppress(OSError):
            channel.send_json(Kind.VERDICT, {"ok": False, "reason": reason, "retryable": retryable})
        channel.close()

    def welcome(self, hello: Hello, body: Welcome) -> None:
        self.channels[hello.rank].send_json(Kind.VERDICT, {"ok": True, **asdict(body)})

    def form_group(self, round_timeout: float) -> StarGroup:
        """The admitted silos as a group; later connections are refused with a line."""
        self._formed.set()
        for channel in self.channels.values():
            channel.limit = round_timeout
        return StarGroup(self, dict(sorted(self.channels.items())))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.close()


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    """Listen on ``address`` when its host is this machine's (127.0.0.1 in a test, a site's own
    interface); a name that is not, such as a Kubernetes Service in front of the pod, means
    every interface, as torch.distributed's store does."""
    host, port = address
    try:
        return socket.create_server((host, port), backlog=backlog)
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL and not isinstance(exc, socket.gaierror):
            raise FederationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    try:
        return socket.create_server(("", port), backlog=backlog)
    except OSError as exc:
        raise FederationError(f"cannot listen on port {port}: {exc.strerror}") from None


def _reason(exc: BaseException, waited: float | None = None) -> str:
    """One short line for a failed connection: OpenSSL's reason, what verification said, or how
    long nothing came (``waited``: the timeout in force, where the caller knows it)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message.rstrip('.')}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"nothing was said within {waited:g}s" if waited else first_line(exc)
    return first_line(exc)


class StarGroup:
    """The aggregator's end of a formed star (rank 0): the operations of comm.Group."""

    rank = 0
    device = torch.device("cpu")

    def __init__(self, listener: StarListener, channels: dict[int, Channel]) -> None:
        self.listener, self.channels = listener, channels
        self.world_size = len(channels) + 1
        self._lock = threading.Lock()
        # One receive buffer per silo for the whole federation: 1 MiB buffers made afresh each round,
        # in a new thread each time, land in glibc's per-thread arenas and grew the aggregator's RSS
        # by a MiB every few rounds (benchmarks/tls_bench.py's slope).
        self._chunks = {rank: torch.empty(CHUNK_BYTES, dtype=torch.uint8) for rank in channels}

    def _each(self, work: Callable[[Channel], None]) -> None:
        """``work`` on every silo's channel at once. The first failure raises LinkLost naming that
        silo as soon as it happens: a dead silo is named at once even while the others still train."""
        failed: list[tuple[int, BaseException]] = []
        lock, settled = threading.Lock(), threading.Event()
        pending = [len(self.channels)]

        def run(channel: Channel) -> None:
            try:
                work(channel)
            except BaseException as exc:  # handed to the caller below
                with lock:
                    failed.append((channel.rank, exc))
                settled.set()
            finally:
                with lock:
                    pending[0] -= 1
                    if not pending[0]:
                        settled.set()

        threads = {c.rank: threading.Thread(target=run, args=(c,), daemon=True) for c in self.channels.values()}
        for thread in threads.values():
            thread.start()
        settled.wait()
        if failed:
            rank, exc = failed[0]
            for other, thread in threads.items():  # waiting on healthy silos: stop those reads
                if thread.is_alive():
                    self.channels[other].stop_reading()
        for thread in threads.values():
            thread.join()
        if failed:
            raise LinkLost(rank, _reason(exc))

    def broadcast_(self, flat: torch.Tensor) -> None:
        """The global model to every silo, concurrently."""
        payload = bytes_of(flat)
        self._each(lambda channel: channel.send(Kind.TENSOR, payload))

    def reduce_sum_(self, flat: torch.Tensor) -> None:
        """Every silo's update added into ``flat`` chunk by chunk, as the chunks arrive."""
        step = max(1, CHUNK_BYTES // flat.element_size())

        def receive(channel: Channel) -> None:
            chunk = self._chunks[channel.rank].view(flat.dtype)
            if channel.expect(Kind.TENSOR) != flat.numel() * flat.element_size():
                raise ConnectionError(f"silo {channel.rank} sent an update of another size")
            for start in range(0, flat.numel(), step):
                part = chunk[: min(step, flat.numel() - start)]
                channel._fill(bytes_of(part))
                with self._lock:  # one writer at a time; receiving goes on in the other threads
                    flat[start : start + part.numel()].add_(part)

        self._each(receive)

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's small fp64 row, stacked by rank, and the stack sent back to every silo."""
        row = row.to(torch.float64).contiguous()
        rows = torch.zeros(self.world_size, row.numel(), dtype=torch.float64)
        rows[0] = row
        self._each(lambda channel: channel.recv_exactly(Kind.ROWS, bytes_of(rows[channel.rank])))
        self._each(lambda channel: channel.send(Kind.ROWS, bytes_of(rows)))
        return rows

    def announce_abort(self, reason: str, lost: Sequence[int] = ()) -> None:
        """Tell every silo still connected why the federation stops; their next read raises it."""
        for rank, channel in self.channels.items():
            if rank not in lost:
                with contextlib.suppress(OSError):
                    channel.limit = 2.0  # a silo that stopped reading must not hold us
                    channel.send(Kind.ABORT, reason.encode())

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """A lost silo becomes one line naming it and the phase; the others are told why."""
        try:
            yield
        except LinkLost as exc:
            message = f"lost silo {exc.rank} during {what} ({exc.reason})"
            self.announce_abort(message, [exc.rank])
            raise FederationError(message) from None

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.listener.close()


# -- a silo's side ------------------------------------------------------------------------------


def dial(address: tuple[str, int], context: ssl.SSLContext, server_name: str, timeout: float) -> ssl.SSLSocket:
    """Connect to the aggregator, retrying until ``timeout`` (it may start after us), and do the
    TLS handshake, which checks the aggregator's certificate against the CA and ``server_name``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=min(GREETING_SECONDS, timeout))
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"cannot reach the aggregator at {address[0]}:{address[1]} within {timeout:g}s ({_reason(exc)})"
                ) from None
            time.sleep(0.5)
    try:
        tls = context.wrap_socket(sock, server_hostname=server_name)
    except (OSError, ValueError) as exc:
        sock.close()
        # Our own check of its certificate (wrong CA, wrong name, expired) fails the same way at
        # every try: permanent. A reset or a timeout mid-handshake may not be.
        raise FederationError(
            f"TLS handshake with the aggregator at {address[0]}:{address[1]} failed: {_reason(exc)}",
            retryable=not isinstance(exc, ssl.SSLCertVerificationError),
        ) from None
    keep_alive(tls)
    return tls


class StarLink:
    """A silo's end of the star (rank R): the operations of comm.Group over its one connection."""

    device = torch.device("cpu")

    def __init__(self, sock: ssl.SSLSocket, rank: int) -> None:
        self.channel, self.rank = Channel(sock, rank), rank
        self.world_size = 0  # known once the group forms

    def request_admission(self, hello_fields: dict[str, Any], timeout: float) -> Welcome:
        """Wait for the aggregator to accept this certificate, send the hello, wait for the verdict
        (the aggregator answers once all K are in)."""
        self.channel.limit = timeout
        try:
            self.channel.recv_json(Kind.IDENTIFIED)
            self.channel.send_json(Kind.HELLO, {"rank": self.rank, **hello_fields})
            verdict = self.channel.recv_json(Kind.VERDICT)
        except Aborted as exc:
            # Refused at the door, before any verdict: only a federation already formed is worth
            # another try (its ABORT carries the reason only).
            raise JoinRefused(
                f"the aggregator refused silo {self.rank}: {exc}", retryable=str(exc) == ALREADY_FORMED
            ) from None
        except ssl.SSLError as exc:  # the aggregator's OpenSSL refused our certificate: its alert says why
            raise JoinRefused(f"the aggregator refused silo {self.rank}'s certificate ({_reason(exc)})") from None
        except (OSError, ValueError) as exc:
            raise FederationError(
                f"silo {self.rank} got no verdict: {_reason(exc)}; the aggregator went away or did not answer in time"
            ) from None
        if not verdict.pop("ok"):
            raise JoinRefused(
                f"the aggregator refused silo {self.rank}: {verdict['reason']}",
                retryable=verdict.pop("retryable", False),
            )
        return Welcome(**verdict)

    def form_group(self, world_size: int, round_timeout: float) -> StarLink:
        self.world_size = world_size
        self.channel.limit = round_timeout
        return self

    def broadcast_(self, flat: torch.Tensor) -> None:
        self.channel.recv_exactly(Kind.TENSOR, bytes_of(flat))

    def reduce_sum_(self, flat: torch.Tensor) -> None:
        self.channel.send(Kind.TENSOR, bytes_of(flat.contiguous()))

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        row = row.to(torch.float64).contiguous()
        self.channel.send(Kind.ROWS, bytes_of(row))
        rows = torch.empty(self.world_size, row.numel(), dtype=torch.float64)
        self.channel.recv_exactly(Kind.ROWS, bytes_of(rows))
        return rows

    def announce_abort(self, reason: str, lost: Sequence[int] = ()) -> None:
        """Only the aggregator stops a federation; a silo's failure shows when its link closes."""

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """The aggregator's reason when it stopped the federation, else one line naming it lost."""
        try:
            yield
        except Aborted as exc:
            raise FederationError(f"the aggregator stopped the federation: {exc}") from None
        except (OSError, ConnectionError) as exc:
            reason = self._pending_abort()
            if reason is not None:
                raise FederationError(f"the aggregator stopped the federation: {reason}") from None
            raise FederationError(f"lost the aggregator during {what} ({_reason(exc)})") from None

    def _pending_abort(self) -> str | None:
        """An ABORT the aggregator sent while this silo was still writing (its write then fails)."""
        try:
            self.channel.limit = 1.0
            self.channel.expect(Kind.ABORT)
        except Aborted as exc:
            return str(exc)
        except (OSError, ValueError):
            return None
        return None

    def close(self) -> None:
        self.channel.close()
