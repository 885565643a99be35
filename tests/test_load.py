"""Load: 32 silo processes and the aggregator on this machine, a tiny model, three rounds.

Not in the default run (``-m slow``): 33 Python processes importing torch take minutes on two
cores. The test prints its wall time and peak memory (summed over the process tree, sampled with
psutil), the figures docs/reliability.md quotes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.procs import start
from tests.tiny import sentiment_rows, write_csv

SILOS = 32
ROWS_PER_SILO = 8
ROUNDS = 3


def descendants(root: int) -> list[psutil.Process]:
    """``root`` and every process below it."""
    try:
        process = psutil.Process(root)
        return [process, *process.children(recursive=True)]
    except psutil.Error:  # the root is gone
        return []


def memory_kib(process: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it is gone."""
    try:
        memory = process.memory_full_info()
        return memory.rss // 1024, memory.pss // 1024
    except psutil.Error:
        return 0, 0


class Peak:
    """Samples the process tree's summed RSS and PSS until stopped."""

    def __init__(self, root: int, every: float = 1.0) -> None:
        self.root, self.every = root, every
        self.rss = self.pss = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = descendants(self.root)
            sizes = [memory_kib(process) for process in tree]
            self.rss = max(self.rss, sum(r for r, _ in sizes))
            self.pss = max(self.pss, sum(p for _, p in sizes))
            self.processes = max(self.processes, sum(1 for r, _ in sizes if r))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.usefixtures("one_at_a_time")  # never beside the tests that time failure detection
def test_32_silos_on_one_machine(tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: 8 training rows per silo, a separate test file so that every silo gets exactly 8
    train = write_csv(tmp_path / "train.csv", sentiment_rows(SILOS * ROWS_PER_SILO, seed=1))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(64, seed=2))
    args = [
        "run",
        "--silos",
        str(SILOS),
        "--rounds",
        str(ROUNDS),
        "--model",
        str(tiny_bert),
        "--dataset",
        str(train),
        "--test-dataset",
        str(test),
        "--batch-size",
        "8",
        "--local-epochs",
        "1",
        "--lr",
        "0.1",
        "--checkpoint-dir",
        "ckpt",
        # 33 processes importing torch on two cores: joining alone takes minutes, so three times
        # fedsilo's default join timeout; the round timeout is fedsilo's default (7200 s)
        "--join-timeout",
        "1800",
    ]

    # Execute, sampling memory; the output is drained as it comes so no child blocks on a pipe
    started = time.monotonic()
    process = start(*args, cwd=tmp_path)
    peak = Peak(process.pid)
    lines: list[tuple[float, str]] = []

    def drain() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append((time.monotonic() - started, line))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=3300)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    seconds = time.monotonic() - started
    peak.stop()
    reader.join(timeout=10)
    output = "".join(line for _, line in lines)
    first_round = next((t for t, line in lines if "] round 1/" in line), float("nan"))
    last_joined = max((t for t, line in lines if "] silo " in line and " joined" in line), default=float("nan"))
    with capsys.disabled():
        print(
            f"\nload: {SILOS} silos + aggregator, {ROUNDS} rounds: exit {code} in {seconds:.0f}s wall "
            f"(last silo admitted after {last_joined:.0f}s, round 1 done after {first_round:.0f}s); peak "
            f"{peak.processes} processes, summed RSS {peak.rss / 2**20:.2f} GiB, summed PSS "
            f"{peak.pss / 2**20:.2f} GiB"
        )

    # Assert: a clean finish, every round logged, the last silo's examples counted
    assert code == 0, output[-5000:]
    assert "Traceback" not in output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert steps == list(range(1, ROUNDS + 1))
    assert int(run.data.params[f"silo/{SILOS}/examples"]) == ROWS_PER_SILO
    assert sum(int(run.data.params[f"silo/{r}/examples"]) for r in range(1, SILOS + 1)) == SILOS * ROWS_PER_SILO
