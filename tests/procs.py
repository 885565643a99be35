"""Run fedsilo commands as real processes, the way users and Kubernetes do."""

from __future__ import annotations

import os
import subprocess
import sys
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
