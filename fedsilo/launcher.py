"""``fedsilo run``: the whole federation on this machine, as the same commands a cluster runs.

Each role is a child process running ``fedsilo aggregator`` or ``fedsilo silo --rank R`` with
the resolved settings in a temporary config file; there is no second code path.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedsilo import certs
from fedsilo.config import Settings
from fedsilo.errors import PERMANENT_EXIT_CODES, FederationError

# How long a child gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    role: str
    process: subprocess.Popen[str]
    reader: threading.Thread


def _pump(role: str, stream: object) -> None:
    prefix = f"[{role}] "
    for line in stream:  # type: ignore[attr-defined]
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def _threads_per_process(silos: int) -> str:
    """Share the cores among silos; the aggregator mostly waits, so it takes one."""
    return str(max(1, (os.cpu_count() or 1) // silos))


def _start(role: str, argv: list[str], env: dict[str, str]) -> Child:
    process = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    reader = threading.Thread(target=_pump, args=(role, process.stdout), daemon=True)
    reader.start()
    return Child(role, process, reader)


def _stop_all(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
    for child in children:
        child.reader.join(timeout=2)


def throwaway_identities(directory: Path, silos: int, host: str) -> dict[int, list[str]]:
    """A federation CA and a certificate per rank in ``directory`` (the run's own, removed with it),
    for ``--transport tls`` without certificates given: the flags each rank adds (0: the aggregator)."""
    ca_cert, ca_key = certs.init_ca(directory, "fedsilo run (throwaway) CA", days=2)
    flags = {}
    for rank in range(silos + 1):
        role: certs.Role = "aggregator" if rank == 0 else "silo"
        key, cert = certs.issue(
            directory, ca_cert, ca_key, role, rank or None, hosts=[host] if rank == 0 else (), days=2
        )
        flags[rank] = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca_cert)]
    return flags


def launch_once(config_path: Path, silos: int, env: dict[str, str], rank_flags: dict[int, list[str]]) -> None:
    """Start the aggregator and K silos; return when all succeed, raise naming the first failure."""
    base = [sys.executable, "-m", "fedsilo"]
    silo_env = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", _threads_per_process(silos))}
    children = [
        _start(
            "aggregator",
            [*base, "aggregator", "--config", str(config_path), *rank_flags.get(0, [])],
            {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")},
        )
    ]
    try:
        for rank in range(1, silos + 1):
            argv = [*base, "silo", "--rank", str(rank), "--config", str(config_path), *rank_flags.get(rank, [])]
            children.append(_start(f"silo {rank}", argv, silo_env))
        while True:
            for child in children:
                code = child.process.poll()
                if code not in (None, 0):
                    # A child's configuration error is ours too: report it as permanent.
                    raise FederationError(
                        f"{child.role} failed (exit code {code}); stopped the others",
                        retryable=code not in PERMANENT_EXIT_CODES,
                    )
            if all(child.process.poll() == 0 for child in children):
                return
            time.sleep(0.2)
    finally:
        _stop_all(children)


def run_local(settings: Settings, restarts: int) -> None:
    """Run the federation locally, restarting it up to ``restarts`` times (it resumes); a child's
    permanent error (a bad setting, bad data, a refused join: exit code 78) is not retried."""
    flat = settings.flat()
    if settings.federation.aggregator is None:
        flat["aggregator"] = f"127.0.0.1:{free_port()}"
    # The children read every setting from the file: a FEDSILO_* setting variable in our
    # environment has been resolved into it already and, inherited, would win over it (a flag
    # given to `fedsilo run` would lose to it). The token variable is not a setting: it stays.
    settings_vars = {f"FEDSILO_{key.upper()}" for key in flat} | {"FEDSILO_CONFIG"}
    env = {k: v for k, v in os.environ.items() if k not in settings_vars}
    env["PYTHONUNBUFFERED"] = "1"  # children's lines must reach us as they happen
    if not env.get("FEDSILO_TOKEN") and settings.federation.token_file is None:
        env["FEDSILO_TOKEN"] = secrets.token_hex(16)  # private to this run's processes
    with tempfile.TemporaryDirectory(prefix="fedsilo-run-") as tmp:
        config_path = Path(tmp) / "settings.yaml"
        config_path.write_text(yaml.safe_dump(flat, sort_keys=False))
        fed = settings.federation
        rank_flags: dict[int, list[str]] = {}
        if fed.transport == "tls" and fed.tls_cert is None:
            host = flat["aggregator"].rpartition(":")[0].strip("[]")
            rank_flags = throwaway_identities(Path(tmp), fed.silos, host)
        for attempt in range(restarts + 1):
            try:
                launch_once(config_path, fed.silos, env, rank_flags)
                return
            except FederationError as exc:
                if attempt == restarts or not exc.retryable:
                    raise
                print(f"fedsilo: {exc}; restarting the federation ({attempt + 1}/{restarts})", flush=True)
