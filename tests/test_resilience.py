"""Lose a rank mid-round: the others stop fast and name it; a restart resumes exactly.

The kill tests SIGKILL a role of ``fedsilo run --restarts 1`` at a random point of a round (any
phase: training, reduce, evaluation, checkpoint) and compare the final model with that of an
uninterrupted run of the same settings. One of them (a silo) is in the default run; the rest are
``slow``. Each test prints its timings, the figures docs/reliability.md quotes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedsilo.launcher import free_port
from tests.mlmodels import logged_model_names
from tests.procs import Watched, children, final_weights, finish, start

ROUNDS = 5
# Rounds of a few seconds: long enough that a random instant can land in any phase of one. Five, so
# that a kill which a loaded machine delays past round 2 still lands before the last round ends
# (with three, one landed after the federation had finished, and the restart began anew). The
# join and round timeouts are fedsilo's defaults (600 s, 7200 s), which a loaded machine cannot
# break; the tests of the round timeout set their own.
SETTINGS = [
    "--silos",
    "2",
    "--rounds",
    str(ROUNDS),
    "--batch-size",
    "8",
    "--lr",
    "0.3",
    "--local-epochs",
    "2",
    "--seed",
    "5",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, sentiment_csv) -> torch.Tensor:
    work = tmp_path_factory.mktemp("uninterrupted")
    started = time.monotonic()
    code, out = finish(
        start(
            "run",
            *SETTINGS,
            "--model",
            str(tiny_bert),
            "--dataset",
            str(sentiment_csv),
            "--checkpoint-dir",
            "ckpt",
            cwd=work,
        )
    )
    assert code == 0, out
    print(f"\nuninterrupted run of {ROUNDS} rounds: {time.monotonic() - started:.1f}s")
    return final_weights(work / "ckpt")


def round_seconds(line: str) -> float:
    """The duration at the end of a ``round r/R: ... (12.3s)`` line."""
    return float(line.rsplit("(", 1)[1].split("s)")[0])


def kill_mid_round_and_resume(
    tmp_path: Path, model: Path, data: Path, reference: torch.Tensor, victim: str, reaper: list[Watched], *extra: str
) -> None:
    started = time.monotonic()
    run = Watched(
        start(
            "run",
            *SETTINGS,
            "--model",
            str(model),
            "--dataset",
            str(data),
            "--checkpoint-dir",
            "ckpt",
            "--restarts",
            "1",
            *extra,
            cwd=tmp_path,
        )
    )
    reaper.append(run)
    # Round 2 starts as round 1's line arrives; kill at a random instant of it, guessing its length
    # from round 1's (should the guess overshoot, the kill lands in round 3: still a mid-round kill).
    first = run.wait_for(f"round 1/{ROUNDS}")
    line = next(line for line in run.lines if f"round 1/{ROUNDS}" in line)
    time.sleep(max(0.0, first + random.uniform(0.0, 0.9 * round_seconds(line)) - time.monotonic()))
    (pid,) = [pid for pid, cmd in children(run.process.pid).items() if f"fedsilo {victim} " in cmd]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    restarted = run.wait_for("restarting the federation (1/1)")
    resumed = run.wait_for("resuming after round")
    code, out = run.result()
    finished = time.monotonic()
    print(
        f"\nkilled {victim} {killed - first:.1f}s into round 2: federation stopped after {restarted - killed:.1f}s, "
        f"resumed after {resumed - killed:.1f}s, done after {finished - killed:.1f}s ({finished - started:.1f}s in all)"
    )

    assert code == 0, out
    assert "Traceback" not in out
    got = final_weights(tmp_path / "ckpt")
    assert (got - reference).norm() <= 1e-6 * reference.norm(), (got - reference).norm()
    # one MLflow run, continued: every round exactly once, the model logged
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    assert run_info.info.status == "FINISHED"
    for metric in ("test_accuracy", "round_seconds", "silo/2/train_loss"):
        steps = [m.step for m in client.get_metric_history(run_info.info.run_id, metric)]
        assert sorted(steps) == list(range(1, ROUNDS + 1)), (metric, steps)
    assert logged_model_names(f"sqlite:///{tmp_path}/mlflow.db", run_info.info.run_id) == ["model"]


def test_a_silo_killed_mid_round_resumes_to_the_uninterrupted_model(
    tmp_path, tiny_bert, sentiment_csv, uninterrupted, reaper
) -> None:
    kill_mid_round_and_resume(tmp_path, tiny_bert, sentiment_csv, uninterrupted, "silo --rank 1", reaper)


@pytest.mark.slow
def test_over_tls_a_silo_killed_mid_round_resumes_to_the_collective_model(
    tmp_path, tiny_bert, sentiment_csv, uninterrupted, reaper
) -> None:
    # The same restart and exact resume on the TLS star (fedsilo run makes its certificates); the
    # reference is the uninterrupted run over torch.distributed.
    kill_mid_round_and_resume(
        tmp_path, tiny_bert, sentiment_csv, uninterrupted, "silo --rank 1", reaper, "--transport", "tls"
    )


@pytest.mark.slow
def test_the_aggregator_killed_mid_round_resumes_to_the_uninterrupted_model(
    tmp_path, tiny_bert, sentiment_csv, uninterrupted, reaper
) -> None:
    kill_mid_round_and_resume(tmp_path, tiny_bert, sentiment_csv, uninterrupted, "aggregator", reaper)


def _federation(
    tmp_path: Path, model: Path, data: Path, reaper: list[Watched], *extra: str
) -> tuple[Watched, list[Watched]]:
    args = [
        *SETTINGS,
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        "--checkpoint-dir",
        "ckpt",
        *extra,
    ]
    aggregator = Watched(start("aggregator", *args, cwd=tmp_path))
    silos = [Watched(start("silo", "--rank", str(rank), *args, cwd=tmp_path)) for rank in (1, 2)]
    reaper.extend([aggregator, *silos])
    return aggregator, silos


def one_error_line(output: str, *expected: str) -> None:
    lines = [line for line in output.splitlines() if line.startswith("fedsilo: error:")]
    assert len(lines) == 1 and all(part in lines[0] for part in expected), output
    assert "Traceback" not in output and "frame #" not in output, output


# A silo's line at the end of a round's local training (``round 2: batch 14/14 loss 0.6931``).
LAST_BATCH = re.compile(r"^round \d+: batch (\d+)/\1 ")


def detection(survivors: dict[str, Watched], since: float, timeout: float) -> dict[str, tuple[float, float]]:
    """For each survivor: seconds to its error line, and to its exit, from ``since`` or, for a silo
    still training then, from the end of that training. A survivor can only notice the lost rank
    in its next collective; a loaded machine stretches the training before it, not the detection."""
    seconds = {}
    for name, p in survivors.items():
        said_at = p.wait_for("fedsilo: error:", timeout=timeout)
        start = max(
            [
                since,
                *(at for at, line in zip(p.times, p.lines, strict=False) if at <= said_at and LAST_BATCH.match(line)),
            ]
        )
        p.result(timeout=timeout)
        seconds[name] = (said_at - start, time.monotonic() - start)
    print(
        "\n"
        + ", ".join(
            f"{name}: error line after {said:.1f}s, exited after {gone:.1f}s" for name, (said, gone) in seconds.items()
        )
    )
    return seconds


# Exiting takes a few seconds more than the error line: the interpreter's teardown of torch,
# transformers and MLflow (up to ~10 s measured on two loaded cores).
EXIT_SECONDS = 30


@pytest.mark.slow
@pytest.mark.usefixtures("one_at_a_time")  # timed: never beside the load test
def test_a_killed_silo_is_named_by_every_survivor(tmp_path, tiny_bert, sentiment_csv, reaper) -> None:
    aggregator, (silo1, silo2) = _federation(tmp_path, tiny_bert, sentiment_csv, reaper)
    aggregator.wait_for(f"round 1/{ROUNDS}")
    silo1.process.kill()
    killed_at = time.monotonic()
    seconds = detection({"aggregator": aggregator, "silo 2": silo2}, killed_at, timeout=60)
    for p in (aggregator, silo2):
        code, out = p.result()
        assert code == 1
        one_error_line(out, "lost silo 1 during round 2")
    # a killed peer is seen at once; naming it waits for its heartbeat to go stale (3 s)
    assert all(said < 10 and gone < 10 + EXIT_SECONDS for said, gone in seconds.values()), seconds


@pytest.mark.slow
@pytest.mark.usefixtures("one_at_a_time")  # timed: never beside the load test
def test_a_stalled_silo_is_named_after_the_round_timeout(tmp_path, tiny_bert, sentiment_csv, reaper) -> None:
    # Short rounds (one local epoch) so that the short round timeout only ever fires on the stall.
    timeout = 20
    aggregator, (silo1, silo2) = _federation(
        tmp_path, tiny_bert, sentiment_csv, reaper, "--local-epochs", "1", "--round-timeout", str(timeout)
    )
    aggregator.wait_for(f"round 1/{ROUNDS}")
    silo1.process.send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can tell
    stalled_at = time.monotonic()
    try:
        seconds = detection({"aggregator": aggregator, "silo 2": silo2}, stalled_at, timeout=timeout + 60)
    finally:
        silo1.process.kill()
    code, out = aggregator.result()
    assert code == 1
    one_error_line(out, "lost silo 1 during round 2")
    code, out = silo2.result()
    assert code == 1
    one_error_line(out, "silo 1", "round 2")
    assert all(said < timeout + 8 and gone < timeout + 8 + EXIT_SECONDS for said, gone in seconds.values()), seconds


@pytest.mark.slow
@pytest.mark.usefixtures("one_at_a_time")  # timed: never beside the load test
def test_a_stalled_aggregator_is_named_by_the_silos(tmp_path, tiny_bert, sentiment_csv, reaper) -> None:
    timeout = 20
    aggregator, silos = _federation(
        tmp_path, tiny_bert, sentiment_csv, reaper, "--local-epochs", "1", "--round-timeout", str(timeout)
    )
    aggregator.wait_for(f"round 1/{ROUNDS}")
    aggregator.process.send_signal(signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        seconds = detection({"silo 1": silos[0], "silo 2": silos[1]}, stalled_at, timeout=timeout + 60)
    finally:
        aggregator.process.kill()
    for silo in silos:
        code, out = silo.result()
        assert code == 1
        one_error_line(out, "lost the aggregator during round 2")
    # the round timeout, then one unanswered store query (comm.PROBE_SECONDS)
    assert all(said < timeout + 12 and gone < timeout + 12 + EXIT_SECONDS for said, gone in seconds.values()), seconds
