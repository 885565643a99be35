"""The MLflow outbox against a real ``mlflow server`` on loopback that the test stops and restarts.

``slow``: every server start takes 10-25 s (more on a loaded machine) before ``/health`` answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedsilo.config import build_settings
from fedsilo.launcher import free_port
from fedsilo.tracking import Tracker
from tests.mlmodels import logged_model_names, model_weights_dir
from tests.procs import HANG_GUARD, Watched, children, final_weights, kill_tree, start, stop_group

# Timed (rounds must not all pass while the server restarts): never beside the load test.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_at_a_time")]

ROUNDS = 6
MLFLOW = Path(sys.executable).parent / "mlflow"


class Server:
    """``mlflow server`` on one port and one store, which can be stopped and started again."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = HANG_GUARD) -> float:
        """Start and wait until ``/health`` answers; returns the seconds that took."""
        started = time.monotonic()
        log = (self.directory / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.directory}/db",
                "--artifacts-destination",
                str(self.directory / "art"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: SIGTERM reaches every worker
        )
        while time.monotonic() - started < timeout:
            assert self.process.poll() is None, (self.directory / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not healthy within {timeout}s")

    def stop(self) -> None:
        assert self.process is not None
        stop_group(self.process, grace=30)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    directory = tmp_path / "mlflow"
    directory.mkdir()
    served = Server(directory)
    yield served
    if served.running():
        served.stop()


def test_metrics_survive_a_server_outage_mid_run(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, server: Server
) -> None:
    # Prepare: the server, and a federation of six short rounds that logs to it
    print(f"\nmlflow server healthy after {server.start():.1f}s")
    run = Watched(
        start(
            "run",
            "--silos",
            "2",
            "--rounds",
            str(ROUNDS),
            "--model",
            str(tiny_bert),
            "--dataset",
            str(sentiment_csv),
            "--batch-size",
            "8",
            "--lr",
            "0.3",
            "--local-epochs",
            "4",
            "--tracking-uri",
            server.uri,
            "--checkpoint-dir",
            "ckpt",
            cwd=tmp_path,
        )
    )
    try:
        # Execute: the server goes down after round 2 and stays down for two rounds. The aggregator
        # is held (SIGSTOP; the silos wait in their collective, under fedsilo's default round timeout)
        # while the server stops and while it restarts, which take seconds to a minute: rounds of
        # a tiny model take one or two, and must not all pass meanwhile.
        run.wait_for(f"round 2/{ROUNDS}")
        (aggregator,) = [pid for pid, cmd in children(run.process.pid).items() if "fedsilo aggregator " in cmd]
        with paused(aggregator):
            server.stop()
        run.wait_for(f"round 4/{ROUNDS}")
        with paused(aggregator):
            print(f"mlflow server back after {server.start():.1f}s")
        code, out = run.result()
    finally:
        kill_tree(run.process)

    # Assert: training never stopped, and MLflow holds every round exactly once plus the model
    assert code == 0, out
    assert "Traceback" not in out, out
    assert f"MLflow at {server.uri} is unreachable" in out, out
    assert f"MLflow at {server.uri} is back" in out, out
    back = out.index(f"MLflow at {server.uri} is back: delivered the metrics that were waiting")
    assert out.index(f"round 4/{ROUNDS}") < back < out.index(f"round {ROUNDS}/{ROUNDS}"), out  # mid-run
    client = MlflowClient(tracking_uri=server.uri)
    (run_info,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    assert run_info.info.status == "FINISHED"
    for metric in ("test_accuracy", "train_loss", "round_seconds", "silo/1/train_loss", "silo/2/train_seconds"):
        steps = [m.step for m in client.get_metric_history(run_info.info.run_id, metric)]
        assert sorted(steps) == list(range(1, ROUNDS + 1)), (metric, steps)
    model_dir = model_weights_dir(server.uri, run_info.info.run_id, tmp_path / "downloaded")
    from transformers import AutoModelForSequenceClassification

    from tests.reference import flatten

    loaded = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert torch.allclose(flatten(loaded), final_weights(tmp_path / "ckpt"))


def test_results_of_a_run_that_never_reached_the_server_are_delivered_at_the_next_start(
    tmp_path: Path, tiny_bert: Path, server: Server
) -> None:
    # Prepare: a tracker whose server is down from the start (the port is closed)
    settings = build_settings(
        {
            "dataset": "unused.csv",
            "tracking_uri": server.uri,
            "experiment": "outbox",
            "checkpoint_dir": str(tmp_path / "ckpt"),
        }
    )
    outbox, lines = tmp_path / "ckpt" / "f00d", []
    first = Tracker(settings, ["neg", "pos"], None, outbox, lines.append)
    for round_ in (1, 2, 3):
        first.log_round(round_, {"test_accuracy": round_ / 10, "round_seconds": 1.0})
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    first.log_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)
    )
    assert not first.finish()
    assert first.run_id is None and any("still unreachable" in line for line in lines)

    # Execute: the server is up at the next start with the same outbox
    server.start()
    assert Tracker(settings, ["neg", "pos"], None, outbox, lines.append).finish()

    # Assert: one finished run with every round once and the model
    client = MlflowClient(tracking_uri=server.uri)
    (run_info,) = client.search_runs([client.get_experiment_by_name("outbox").experiment_id])
    assert run_info.info.status == "FINISHED"
    history = client.get_metric_history(run_info.info.run_id, "test_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert logged_model_names(server.uri, run_info.info.run_id) == ["model"]
    assert run_info.data.params["experiment"] == "outbox"
