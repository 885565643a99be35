"""Lose a rank mid-round: the others stop fast and name it; a restart resumes exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedsilo.launcher import free_port

# Not yet run green in a full session; opt in with -m slow.
pytestmark = pytest.mark.slow
from tests.procs import FAST, final_weights, finish, start

SETTINGS = ["--silos", "2", "--rounds", "4", "--batch-size", "8", "--lr", "0.3", "--local-epochs", "3",
            "--seed", "5", *FAST]


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


class Watched:
    """A process whose output is collected line by line while it runs."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process, self.lines = process, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, "".join(self.lines)
            time.sleep(0.02)

    def result(self, timeout: float = 300) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        self.thread.join(timeout=5)
        return code, "".join(self.lines)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, sentiment_csv) -> torch.Tensor:
    work = tmp_path_factory.mktemp("uninterrupted")
    code, out = finish(start("run", *SETTINGS, "--model", str(tiny_bert), "--dataset", str(sentiment_csv),
                             "--checkpoint-dir", "ckpt", cwd=work))
    assert code == 0, out
    return final_weights(work / "ckpt")


@pytest.mark.parametrize("victim", ["silo --rank 1", "aggregator"])
def test_run_resumes_after_a_kill_and_ends_with_the_uninterrupted_model(
    tmp_path, tiny_bert, sentiment_csv, uninterrupted, victim
) -> None:
    run = Watched(start("run", *SETTINGS, "--model", str(tiny_bert), "--dataset", str(sentiment_csv),
                        "--checkpoint-dir", "ckpt", "--restarts", "1", cwd=tmp_path))
    run.wait_for("round 2/4")
    time.sleep(random.uniform(0.0, 0.3))  # somewhere inside round 3
    (pid,) = [pid for pid, cmd in children(run.process.pid).items() if victim in cmd]
    os.kill(pid, signal.SIGKILL)
    code, out = run.result()
    assert code == 0, out
    assert "restarting the federation (1/1)" in out and "resuming after round" in out
    got = final_weights(tmp_path / "ckpt")
    assert (got - uninterrupted).norm() <= 1e-6 * uninterrupted.norm()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    assert run_info.info.status == "FINISHED"
    for metric in ("test_accuracy", "round_seconds"):
        assert sorted(m.step for m in client.get_metric_history(run_info.info.run_id, metric)) == [1, 2, 3, 4]


def _federation(tmp_path: Path, model: Path, data: Path, *extra: str) -> tuple[Watched, list[Watched]]:
    port = free_port()
    args = [*SETTINGS, "--model", str(model), "--dataset", str(data), "--aggregator", f"127.0.0.1:{port}", *extra]
    aggregator = Watched(start("aggregator", *args, cwd=tmp_path))
    silos = [Watched(start("silo", "--rank", str(rank), *args, cwd=tmp_path)) for rank in (1, 2)]
    return aggregator, silos


def test_a_killed_silo_is_named_by_every_survivor(tmp_path, tiny_bert, sentiment_csv) -> None:
    aggregator, (silo1, silo2) = _federation(tmp_path, tiny_bert, sentiment_csv)
    aggregator.wait_for("round 1/4")
    silo1.process.kill()
    killed_at = time.monotonic()
    code, out = aggregator.result(timeout=30)
    assert code == 1 and "fedsilo: error: lost silo 1 during round 2" in out, out
    code2, out2 = silo2.result(timeout=30)
    assert code2 == 1 and "lost silo 1 during round 2" in out2, out2
    assert time.monotonic() - killed_at < 15
    assert "Traceback" not in out + out2


def test_a_stalled_silo_is_named_after_the_round_timeout(tmp_path, tiny_bert, sentiment_csv) -> None:
    aggregator, (silo1, silo2) = _federation(tmp_path, tiny_bert, sentiment_csv, "--round-timeout", "6")
    aggregator.wait_for("round 1/4")
    silo1.process.send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can tell
    stalled_at = time.monotonic()
    try:
        code, out = aggregator.result(timeout=60)
        assert code == 1 and "lost silo 1 during round 2" in out, out
        assert time.monotonic() - stalled_at < 6 + 10
        code2, _ = silo2.result(timeout=60)
        assert code2 == 1
    finally:
        silo1.process.kill()
