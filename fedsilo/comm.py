"""The only module that touches torch.distributed: rendezvous store, group, collectives, teardown.

Ranks: 0 is the aggregator, 1..K the silos. Per round the model crosses the wire as one flat
contiguous buffer in each direction (one broadcast down, one reduce up); a few scalars per silo
travel in a small all-gather. The group is always destroyed, also after an error, because a
torch.distributed group is unusable after any failed collective.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from fedsilo.errors import FederationError, first_line

DEFAULT_PORT = 29500
HEARTBEAT_SECONDS = 1.0
# A rank whose heartbeat is older than this is reported as the one that was lost.
STALE_SECONDS = 3 * HEARTBEAT_SECONDS
# How long a store query may take after a failed collective before the aggregator that hosts
# the store counts as lost too.
PROBE_SECONDS = STALE_SECONDS + 2 * HEARTBEAT_SECONDS

T = TypeVar("T")


class Transport(Protocol):
    """What the round loops use of a formed federation, over torch.distributed (:class:`Group`) or
    the TLS star (:mod:`fedsilo.star`). Rank 0 is the aggregator."""

    rank: int
    world_size: int
    device: torch.device

    def broadcast_(self, flat: torch.Tensor) -> None:
        """Rank 0's ``flat`` overwrites everyone's (the global model going down)."""

    def reduce_sum_(self, flat: torch.Tensor) -> None:
        """Everyone's ``flat`` summed into rank 0's (weighted updates coming up)."""

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's small fp64 ``row``, stacked by rank, on every rank."""

    def announce_abort(self, reason: str, lost: Sequence[int] = ()) -> None:
        """Rank 0: tell the silos still there why the federation stops."""

    def phase(self, what: str) -> contextlib.AbstractContextManager[None]:
        """A failure inside the block becomes a FederationError naming the lost rank and ``what``."""

    def close(self) -> None: ...


def _within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``, or TimeoutError once ``seconds`` have passed.

    A TCPStore query to an aggregator that is stopped (SIGSTOP, a hung host) blocks without any
    timeout of its own; the helper thread is left behind, and the process is about to exit.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="fedsilo-store-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"the rendezvous store did not answer within {seconds:g}s")
    if "error" in box:
        raise box["error"]
    return typing.cast(T, box["value"])


def resolve_address(aggregator: str | None) -> tuple[str, int]:
    """``--aggregator HOST:PORT``, else ``MASTER_ADDR``/``MASTER_PORT``, else loopback."""
    if aggregator:
        host, _, port = aggregator.rpartition(":")
        return host.strip("[]"), int(port)
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT", str(DEFAULT_PORT))
    if not port.isdigit():
        raise FederationError(f"MASTER_PORT must be a port number, got {port!r}", retryable=False)
    return host, int(port)


def pick_backend(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise FederationError("backend 'nccl' needs a GPU; this process trains on the CPU (use gloo)", retryable=False)
    return choice


def open_store(rank: int, host: str, port: int, timeout: float) -> dist.TCPStore:
    """The aggregator hosts the rendezvous key-value store; silos connect to it.

    ``timeout`` is the join timeout: how long a silo keeps trying to reach the aggregator, and
    how long any ``wait`` on the store blocks.
    """
    delta = timedelta(seconds=timeout)
    if rank == 0:
        try:
            return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=delta)
        except (RuntimeError, OSError) as exc:
            if "in use" in str(exc).lower():
                raise FederationError(
                    f"cannot listen on port {port}: it is in use (another aggregator running? "
                    "pick another with --aggregator HOST:PORT)"
                ) from None
            raise FederationError(f"cannot listen on {host}:{port}: {first_line(exc)}") from None
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=delta)
    except (RuntimeError, OSError) as exc:
        raise FederationError(
            f"cannot reach the aggregator at {host}:{port} within {timeout:g}s ({first_line(exc)})"
        ) from None


@dataclass
class Group:
    """A formed federation: K + 1 ranks, a backend, the rendezvous store."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    store: dist.TCPStore
    address: tuple[str, int]
    _stop: threading.Event = field(default_factory=threading.Event)
    # Silos expected to read an announced abort reason before close() lets the store go.
    _readers: int = 0

    # -- collectives -----------------------------------------------------------------------------
    def broadcast_(self, flat: torch.Tensor) -> None:
        """Rank 0's ``flat`` overwrites everyone's (the global model going down)."""
        dist.broadcast(flat, src=0)

    def reduce_sum_(self, flat: torch.Tensor) -> None:
        """Everyone's ``flat`` summed into rank 0's (weighted updates coming up)."""
        dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's small fp64 ``row``, stacked by rank (all-gather: works on gloo and NCCL)."""
        row = row.to(self.device, torch.float64)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        return torch.stack(rows).cpu()

    # -- liveness ---------------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        """Write a timestamp to the store every second from a thread with its own connection.

        Collective errors say which socket broke, not which rank; the heartbeats let the
        survivors name the rank that stopped.
        """
        host, port = self.address
        beat = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10))

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    beat.set(f"fedsilo/alive/{self.rank}", repr(time.time()))
                except Exception:  # the store is gone: the aggregator ended; nothing to report
                    return
                self._stop.wait(HEARTBEAT_SECONDS)

        threading.Thread(target=loop, name="fedsilo-heartbeat", daemon=True).start()

    def lost_ranks(self) -> list[int]:
        """Ranks whose heartbeat went stale, waiting long enough for a fresh death to show."""
        deadline = time.time() + STALE_SECONDS + HEARTBEAT_SECONDS
        while True:
            now, stale = time.time(), []
            for rank in range(self.world_size):
                if rank == self.rank:
                    continue
                key = f"fedsilo/alive/{rank}"
                try:
                    last = float(_within(PROBE_SECONDS, functools.partial(self.store.get, key)).decode())
                except Exception:
                    if self.rank != 0:
                        return [0]  # the store lives in the aggregator: no answer means it is gone
                    last = 0.0  # this silo never sent a heartbeat
                if now - last > STALE_SECONDS:
                    stale.append(rank)
            if stale or time.time() > deadline:
                return stale
            time.sleep(0.25)

    def announce_abort(self, reason: str, lost: Sequence[int] = ()) -> None:
        """Leave the reason where silos look when their collective fails (aggregator only).

        :meth:`close` then keeps the store, which lives in this process, up until the silos
        that are not ``lost`` have read it.
        """
        try:
            self.store.set("fedsilo/abort", reason)
        except Exception:
            return
        self._readers = self.world_size - 1 - len(set(lost) - {0})

    def acknowledge_abort(self) -> None:
        """Tell the aggregator this silo is done with the store and it may exit (silos only)."""
        try:
            _within(PROBE_SECONDS, lambda: self.store.add("fedsilo/abort_read", 1))
        except Exception:
            pass

    def abort_reason(self) -> str | None:
        """Why the aggregator stopped the federation, if it said so.

        Raises TimeoutError when the aggregator, which hosts the store, does not answer at all.
        """

        def read() -> str | None:
            if self.store.check(["fedsilo/abort"]):
                return self.store.get("fedsilo/abort").decode()
            return None

        try:
            return _within(PROBE_SECONDS, read)
        except TimeoutError:
            raise
        except Exception:  # the store is gone; lost_ranks names the aggregator
            return None

    def phase(self, what: str) -> contextlib.AbstractContextManager[None]:
        """A failed collective inside the block becomes one line naming the lost rank (:func:`collective_phase`)."""
        return collective_phase(self, what)

    def close(self) -> None:
        self._stop.set()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._readers:
            # The silos' collectives fail now that the group is gone; give them a moment to
            # read why before this process, and the store with it, goes away.
            deadline = time.monotonic() + PROBE_SECONDS
            while time.monotonic() < deadline:
                try:
                    if self.store.add("fedsilo/abort_read", 0) >= self._readers:
                        break
                except Exception:
                    break
                time.sleep(0.1)


def form_group(
    store: dist.TCPStore,
    rank: int,
    world_size: int,
    backend: str,
    device: torch.device,
    round_timeout: float,
    address: tuple[str, int],
) -> Group:
    """Join the process group on the already-authenticated store.

    The group's timeout is the round timeout: the longest any rank may wait inside one
    collective, which includes waiting for the slowest silo's local training.
    """
    if backend == "nccl":
        torch.cuda.set_device(device)
    comm_device = device if backend == "nccl" else torch.device("cpu")
    try:
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("pg", store),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=round_timeout),
        )
    except (RuntimeError, ValueError) as exc:
        raise FederationError(f"cannot form the {backend} group: {first_line(exc)}") from None
    group = Group(rank, world_size, backend, comm_device, store, address)
    group.start_heartbeat()
    return group


@contextmanager
def collective_phase(group: Group, what: str) -> Iterator[None]:
    """Turn a failed collective into one line that names the lost rank and the phase."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError and friends derive from RuntimeError
        lost: list[int] | None = None
        if group.rank != 0:
            try:
                reason = group.abort_reason()
            except TimeoutError:  # a stopped or hung aggregator: its store does not answer
                reason, lost = None, [0]
            if reason:
                group.acknowledge_abort()
                raise FederationError(f"the aggregator stopped the federation: {reason}") from None
        if lost is None:
            lost = group.lost_ranks()
        who = ", ".join("the aggregator" if r == 0 else f"silo {r}" for r in lost) or "a peer"
        message = f"lost {who} during {what} ({first_line(exc)})"
        if group.rank == 0:
            group.announce_abort(message, lost)
        elif lost != [0]:
            group.acknowledge_abort()
        raise FederationError(message) from None
