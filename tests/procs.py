"""Run fedsilo commands as real processes, the way users and Kubernetes do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil
import torch

# Margins. Federations in tests run with fedsilo's own join and round timeouts (600 s and
# 7200 s): a test that does not test a timeout passes no --join-timeout or --round-timeout, so a
# loaded machine (start-up, MLflow's first sqlite store, a round of training all slow down several
# times over) cannot break it, and only a failing test would ever wait on them. The waits below
# only guard against a hang: HANG_GUARD exceeds the join timeout, so a process that waits in
# vain names its own failure before the test gives up on it.
HANG_GUARD = 900.0


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsilo", *args]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run(*args: str, cwd: Path, timeout: float = HANG_GUARD, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args), cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=timeout
    )


def run_timed(
    *args: str, cwd: Path, timeout: float = HANG_GUARD, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[tuple[float, str]]]:
    """``run``, and when each line arrived: (seconds since the start, line) for stdout and stderr
    together, so that a test can time one phase of a process without its start-up."""
    process = subprocess.Popen(
        command(*args), cwd=cwd, env=environment(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started, arrivals, texts = time.monotonic(), [], {}

    def read(name: str, stream: IO[str]) -> None:
        lines = []
        for line in stream:
            arrivals.append((time.monotonic() - started, line))
            lines.append(line)
        texts[name] = "".join(lines)

    readers = [
        threading.Thread(target=read, args=(name, stream), daemon=True)
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise
    for reader in readers:
        reader.join(timeout=10)
    return subprocess.CompletedProcess(process.args, code, texts.get("stdout", ""), texts.get("stderr", "")), arrivals


def start(*args: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(*args), cwd=cwd, env=environment(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen[str], timeout: float = HANG_GUARD) -> tuple[int, str]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return process.returncode, out


def final_weights(checkpoint_dir: Path) -> torch.Tensor:
    """The global model after the last round, from the aggregator's checkpoint."""
    (path,) = checkpoint_dir.glob("*/latest.pt")
    return torch.load(path, weights_only=True)["weights"]


def assert_one_line_error(output: str, expected: str) -> None:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("fedsilo: error:")]
    assert lines and expected in lines[-1], output


class Watched:
    """A started process whose merged output is collected line by line, with arrival times, while
    it runs, so a test can wait for a line and know when it came."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process, self.lines = process, []
        self.times: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.times.append(time.monotonic())
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = HANG_GUARD) -> float:
        """Wait for a line containing ``text``; return when it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for at, line in zip(self.times, self.lines, strict=False):
                if text in line:
                    return at
            exited = self.process.poll() is not None and not self._reader.is_alive()
            assert not exited, f"exited without {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{self.output}"
            time.sleep(0.02)

    def result(self, timeout: float = HANG_GUARD) -> tuple[int, str]:
        """Exit code and whole output; a process still running after ``timeout`` is killed and fails the test."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.process)
            raise AssertionError(f"still running after {timeout}s:\n{self.output}") from None
        self._reader.join(timeout=10)
        return code, self.output


def watch(*args: str, cwd: Path, **env: str) -> Watched:
    return Watched(start(*args, cwd=cwd, **env))


def children(parent: int) -> dict[int, str]:
    """Command lines of ``parent``'s child processes."""
    found = {}
    for child in psutil.Process(parent).children():
        try:
            found[child.pid] = " ".join(child.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
    return found


def kill_tree(process: subprocess.Popen[str]) -> None:
    """SIGKILL a process that is still running, and everything below it (``fedsilo run``'s roles) first."""
    if process.poll() is None:
        try:
            below = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            below = []
        for child in below:
            try:
                child.kill()
            except psutil.Error:
                pass
        process.kill()
        process.wait()


def stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group of a process started with ``start_new_session=True`` (every
    worker it forked), then SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
