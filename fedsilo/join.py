"""The join handshake, spoken over the rendezvous key-value store before any tensor moves.

1. The aggregator publishes a fresh nonce.
2. A silo claims its rank (an atomic counter: a second claimant is refused at once), then
   posts a hello: an HMAC of the nonce under the join token, its own nonce, its settings,
   label set and model fingerprint.
3. The aggregator checks the proof at once (a stranger is refused, its claim released, and
   the federation keeps waiting for the real silo), then, when all K are in, that everyone
   agrees on settings, labels and model.
4. Each silo gets a verdict carrying the aggregator's own proof (so a silo never sends
   updates to an impostor), the label set and the round to start from.

The token itself never travels and is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from fedsilo.errors import ConfigError, FederationError, JoinRefused, first_line
from fedsilo.progress import Log


class Store(Protocol):
    def set(self, key: str, value: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def add(self, key: str, amount: int) -> int: ...
    def check(self, keys: list[str]) -> bool: ...
    def delete_key(self, key: str) -> bool: ...


def proof(token: str | None, purpose: str, nonce: str, rank: int) -> str:
    if not token:
        return ""
    message = f"{purpose}:{nonce}:{rank}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def _matches(token: str | None, given: str, purpose: str, nonce: str, rank: int) -> bool:
    if not token:
        return True
    return hmac.compare_digest(proof(token, purpose, nonce, rank), given)


@dataclass(frozen=True)
class Hello:
    rank: int
    nonce: str
    proof: str
    settings: dict[str, Any]
    labels: list[str] | None
    architecture: str
    train_examples: int
    eval_examples: int


@dataclass(frozen=True)
class Welcome:
    """What the aggregator tells every admitted silo."""

    labels: list[str]
    start_round: int
    eval_on_silos: bool
    last_round: int  # the federation's last round: --rounds, or earlier when a silo's privacy budget ends it


def settings_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """``key=theirs (aggregator: mine)`` for the first few keys that differ, or None. A key one side
    leaves out (a later setting at its default: config.LATER_KEYS) shows as ``default``."""

    def shown(side: dict[str, Any], key: str) -> str:
        return repr(side[key]) if key in side else "default"

    keys = sorted(set(mine) | set(theirs))
    diffs = [
        f"{k}={shown(theirs, k)} (aggregator: {shown(mine, k)})"
        for k in keys
        if k not in mine or k not in theirs or mine[k] != theirs[k]
    ]
    return ", ".join(diffs[:4]) if diffs else None


def admit_silos(
    store: Store,
    silos: int,
    token: str | None,
    timeout: float,
    log: Log,
) -> dict[int, Hello]:
    """Collect one authenticated hello per rank 1..K (aggregator side)."""
    nonce = secrets.token_hex(16)
    store.set("fedsilo/nonce", nonce)
    pending, hellos = set(range(1, silos + 1)), {}
    deadline = time.monotonic() + timeout
    while pending:
        for rank in sorted(pending):
            key = f"fedsilo/hello/{rank}"
            if not store.check([key]):
                continue
            hello = Hello(**json.loads(store.get(key)))
            store.delete_key(key)
            if not _matches(token, hello.proof, "silo", nonce, rank):
                refuse(store, hello, "wrong or missing join token")
                # Release the rank so the real silo can still claim it: a stranger must not
                # be able to block the federation.
                store.delete_key(f"fedsilo/claim/{rank}")
                log(f"refused a process claiming silo {rank}: wrong or missing join token")
                continue
            hellos[rank] = hello
            pending.discard(rank)
            log(f"silo {rank} joined ({hello.train_examples} training examples)")
        if pending and time.monotonic() > deadline:
            missing = ", ".join(map(str, sorted(pending)))
            reason = f"silo(s) {missing} did not join within {timeout:g}s"
            # The silos already in are blocked on their verdict: tell them why, not just hang up.
            for hello in hellos.values():
                refuse(store, hello, reason, retryable=True)
            raise FederationError(reason)
        time.sleep(0.05)
    return hellos


def refuse(store: Store, hello: Hello, reason: str, *, retryable: bool = False) -> None:
    """Tell a waiting silo no, and whether trying again later can help (its exit code)."""
    verdict = {"ok": False, "reason": reason, "retryable": retryable}
    store.set(f"fedsilo/verdict/{hello.rank}/{hello.nonce}", json.dumps(verdict))


def welcome(store: Store, hello: Hello, token: str | None, body: Welcome) -> None:
    verdict = {"ok": True, "proof": proof(token, "aggregator", hello.nonce, hello.rank), **asdict(body)}
    store.set(f"fedsilo/verdict/{hello.rank}/{hello.nonce}", json.dumps(verdict))


def request_admission(
    store: Store,
    rank: int,
    token: str | None,
    hello_fields: dict[str, Any],
) -> Welcome:
    """Claim ``rank``, prove the token, and wait for the verdict (silo side).

    Blocking ``get`` calls wait up to the store's timeout, which is the join timeout. The store
    lives in the aggregator, so a store error here means it exited or never answered.
    """
    try:
        if store.add(f"fedsilo/claim/{rank}", 1) != 1:
            # Retryable: after a restart the previous aggregator may still hold the old claim.
            raise JoinRefused(
                f"rank {rank} is already taken by another silo (each silo needs its own --rank)", retryable=True
            )
        server_nonce = store.get("fedsilo/nonce").decode()
        nonce = secrets.token_hex(16)
        hello = Hello(rank=rank, nonce=nonce, proof=proof(token, "silo", server_nonce, rank), **hello_fields)
        store.set(f"fedsilo/hello/{rank}", json.dumps(asdict(hello)))
        verdict = json.loads(store.get(f"fedsilo/verdict/{rank}/{nonce}"))
    except (RuntimeError, OSError) as exc:  # torch's DistStoreError and DistNetworkError are RuntimeErrors
        raise FederationError(
            f"silo {rank} got no verdict: the aggregator went away or did not answer in time ({first_line(exc)})"
        ) from None
    if not verdict.pop("ok"):
        raise JoinRefused(
            f"the aggregator refused silo {rank}: {verdict['reason']}", retryable=verdict.get("retryable", False)
        )
    if not _matches(token, verdict.pop("proof"), "aggregator", nonce, rank):
        raise JoinRefused("the aggregator could not prove it holds the join token; not sending it anything")
    return Welcome(**verdict)


def read_token(token_file: Path | None) -> str | None:
    """The join token from ``token_file``, else ``FEDSILO_TOKEN``, else none."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        return token
    return os.environ.get("FEDSILO_TOKEN") or None
