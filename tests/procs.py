"""Run fedsilo commands as real processes, the way users and Kubernetes do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

FAST = ["--join-timeout", "60", "--round-timeout", "120"]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsilo", *args]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=timeout)


def start(*args: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(command(*args), cwd=cwd, env=environment(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
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

    def wait_for(self, text: str, timeout: float = 180) -> float:
        """Wait for a line containing ``text``; return when it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for at, line in zip(self.times, self.lines):
                if text in line:
                    return at
            exited = self.process.poll() is not None and not self._reader.is_alive()
            assert not exited, f"exited without {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{self.output}"
            time.sleep(0.02)

    def result(self, timeout: float = 300) -> tuple[int, str]:
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
    """Command lines of ``parent``'s child processes, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
    return found


def kill_tree(process: subprocess.Popen[str]) -> None:
    """SIGKILL a process that is still running, and its children (``fedsilo run``'s roles) first."""
    if process.poll() is None:
        for pid in children(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
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
