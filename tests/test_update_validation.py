"""Update validation in a real federation: a bad update is named by silo and round, then either
stops the federation (policy ``fail``) or sits the round out and is recorded in MLflow (``skip``).

The pure rules are unit-tested in test_averaging.py and the in-process path in test_simulate.py;
these run the aggregator and silos as processes (``slow``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedsilo.launcher import free_port
from tests.procs import finish, start
from tests.tiny import sentiment_rows, write_csv

pytestmark = pytest.mark.slow


def one_error_line(output: str, *expected: str) -> None:
    lines = [line for line in output.splitlines() if line.startswith("fedsilo: error:")]
    assert len(lines) == 1 and all(part in lines[0] for part in expected), output
    assert "Traceback" not in output, output


def test_a_non_finite_update_stops_the_federation_naming_silo_and_round(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    # An absurd learning rate overflows the weights within the first local steps of round 1.
    port = free_port()
    shared = [
        "--silos",
        "2",
        "--rounds",
        "2",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--lr",
        "1e30",
        "--local-epochs",
        "1",
        "--batch-size",
        "16",
        "--checkpoint-dir",
        "ckpt",
        "--aggregator",
        f"127.0.0.1:{port}",
    ]
    aggregator = start("aggregator", *shared, cwd=tmp_path)
    silos = [start("silo", "--rank", str(rank), *shared, cwd=tmp_path) for rank in (1, 2)]
    (code, out), *silo_results = [finish(p) for p in (aggregator, *silos)]
    assert code == 1
    one_error_line(out, "silo 1 sent a non-finite update in round 1")
    for silo_code, silo_out in silo_results:
        assert silo_code == 1
        one_error_line(silo_out, "the aggregator stopped the federation: silo 1 sent a non-finite update in round 1")
    assert not list((tmp_path / "ckpt").glob("*/latest.pt"))  # no round completed, none checkpointed


def test_an_outlying_update_is_skipped_and_the_skip_is_recorded(tmp_path: Path, tiny_bert: Path) -> None:
    # Private data: silo 3 holds ten times the rows of the others, so it takes ten times the SGD
    # steps and its update is the largest; with a factor of 1.01 over the median it is an outlier.
    files = {
        1: write_csv(tmp_path / "s1.csv", sentiment_rows(30, seed=1)),
        2: write_csv(tmp_path / "s2.csv", sentiment_rows(30, seed=2)),
        3: write_csv(tmp_path / "s3.csv", sentiment_rows(300, seed=3)),
    }
    port = free_port()
    shared = [
        "--silos",
        "3",
        "--partition",
        "none",
        "--rounds",
        "1",
        "--model",
        str(tiny_bert),
        "--lr",
        "0.3",
        "--local-epochs",
        "1",
        "--batch-size",
        "8",
        "--norm-factor",
        "1.01",
        "--update-policy",
        "skip",
        "--checkpoint-dir",
        "ckpt",
        "--aggregator",
        f"127.0.0.1:{port}",
    ]
    aggregator = start("aggregator", *shared, cwd=tmp_path)
    silos = [start("silo", "--rank", str(r), "--dataset", str(files[r]), *shared, cwd=tmp_path) for r in (1, 2, 3)]
    outputs = [finish(p) for p in (aggregator, *silos)]
    assert [code for code, _ in outputs] == [0, 0, 0, 0], outputs
    agg_out = outputs[0][1]
    assert "skipping an update: silo 3's update norm" in agg_out and "in round 1 is over 1.01x the median" in agg_out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    assert run_info.data.metrics["silos_skipped"] == 1.0
    assert run_info.data.params["silo/3/examples"] == "270"  # reported, though left out of the average

    # The skipped silo zeroes its own update (the aggregator sends no verdict): the model is the
    # one silos 1 and 2 make alone, with the same ranks, rows and seeds, in a federation of two.
    alone = tmp_path / "alone"
    alone.mkdir()
    port = free_port()
    pair = ["--silos", "2", *shared[2:]]
    pair[pair.index("--aggregator") + 1] = f"127.0.0.1:{port}"
    aggregator = start("aggregator", *pair, cwd=alone)
    silos = [start("silo", "--rank", str(r), "--dataset", str(files[r]), *pair, cwd=alone) for r in (1, 2)]
    outputs = [finish(p) for p in (aggregator, *silos)]
    assert [code for code, _ in outputs] == [0, 0, 0], outputs
    skipped, pair_only = (
        torch.load(next((d / "ckpt").glob("*/latest.pt")), weights_only=True)["weights"] for d in (tmp_path, alone)
    )
    assert torch.allclose(skipped, pair_only, rtol=0, atol=1e-6)
