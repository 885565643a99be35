"""fedsilo.ledger: one federation's checkpoint and MLflow run, from resume to its final status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedsilo.config import Settings, build_settings, settings_fingerprint
from fedsilo.errors import ConfigError, FederationError
from fedsilo.launcher import free_port
from fedsilo.ledger import FederationRun, discard_finished, simulation_key
from fedsilo.model import build_model, flat_size, load_tokenizer
from tests.reference import flatten

LABELS = ["neg", "pos"]


def settings_for(work: Path, **changes: Any) -> Settings:
    return build_settings(
        {
            "model": "unused",
            "dataset": "unused.csv",
            "rounds": 2,
            "tracking_uri": f"sqlite:///{work}/mlflow.db",
            "checkpoint_dir": str(work / "ckpt"),
            **changes,
        }
    )


def metrics(accuracy: float) -> dict[str, float]:
    return {"test_accuracy": accuracy, "test_loss": 0.5, "train_loss": 0.6, "round_seconds": 1.0}


def run_status(work: Path, run_id: str | None) -> str:
    assert run_id is not None
    return MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db").get_run(run_id).info.status


def test_a_failed_federation_resumes_its_run_and_weights_and_a_finished_one_starts_anew(tmp_path, tiny_bert) -> None:
    # Prepare: a model, and a federation of 2 rounds that fails after round 1
    settings, key = settings_for(tmp_path), "fed"
    model = build_model(str(tiny_bert), LABELS, 0)
    after_round_1 = flatten(model) + 0.25
    lines: list[str] = []
    with pytest.raises(RuntimeError), FederationRun(settings, key, lines.append) as ledger:
        assert ledger.open(LABELS, flat_size(model)) == 1
        ledger.track()
        ledger.record(1, after_round_1, metrics(0.6))
        raise RuntimeError("a silo was lost")
    first_run = ledger.tracker.run_id if ledger.tracker else None
    assert run_status(tmp_path, first_run) == "FAILED"
    assert lines[-1].startswith("round 1/2: test_accuracy=0.6000")

    # Execute: the same federation again, to its end
    fresh = build_model(str(tiny_bert), LABELS, 0)
    with FederationRun(settings, key, lines.append) as again:
        assert again.open(LABELS, flat_size(fresh)) == 2
        again.restore(fresh)
        again.track()
        again.record(2, flatten(fresh) + 0.5, metrics(0.7))
        outcome = again.close(fresh, load_tokenizer(str(tiny_bert)), flatten(fresh))

    # Assert: round 1's weights came back, the same run went on and finished, with both rounds
    assert torch.equal(flatten(fresh), after_round_1)
    assert any(line.startswith("resuming after round 1 from") for line in lines)
    assert outcome.run_id == first_run and outcome.final_accuracy == 0.7
    assert run_status(tmp_path, first_run) == "FINISHED"
    history = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        first_run, "test_accuracy"
    )
    assert [(m.step, m.value) for m in history] == [(1, 0.6), (2, 0.7)]
    # ... and a third start with the same settings is a new federation, in a new run
    with FederationRun(settings, key, lines.append) as third:
        assert third.open(LABELS, flat_size(fresh)) == 1
        third.track()
        assert third.tracker is not None and third.tracker.run_id != first_run


def test_ctrl_c_marks_the_run_killed_and_a_closed_run_stays_finished(tmp_path, tiny_bert) -> None:
    model = build_model(str(tiny_bert), LABELS, 0)
    with pytest.raises(KeyboardInterrupt), FederationRun(settings_for(tmp_path), "a", lambda _: None) as ledger:
        ledger.open(LABELS, flat_size(model))
        ledger.track()
        raise KeyboardInterrupt
    assert ledger.tracker is not None and run_status(tmp_path, ledger.tracker.run_id) == "KILLED"
    # An error after close (the group's teardown, say) must not turn a finished run into a failed one
    with pytest.raises(OSError), FederationRun(settings_for(tmp_path, rounds=1), "b", lambda _: None) as done:
        done.open(LABELS, flat_size(model))
        done.track()
        done.record(1, flatten(model), metrics(0.5))
        done.close(model, load_tokenizer(str(tiny_bert)), flatten(model))
        raise OSError("teardown")
    assert done.tracker is not None and run_status(tmp_path, done.tracker.run_id) == "FINISHED"


def test_a_checkpoint_of_another_label_set_or_size_is_one_clear_error(tmp_path, tiny_bert) -> None:
    settings, model = settings_for(tmp_path), build_model(str(tiny_bert), LABELS, 0)
    with FederationRun(settings, "fed", lambda _: None) as ledger:
        ledger.open(LABELS, flat_size(model))
        ledger.track()
        ledger.record(1, flatten(model), metrics(0.5))
    with pytest.raises(ConfigError, match=r"written for labels \[neg, pos\], this federation has \[a, b\]"):
        FederationRun(settings, "fed", lambda _: None).open(["a", "b"], flat_size(model))
    with pytest.raises(ConfigError, match=f"holds {flat_size(model)} weights, the model has 7"):
        FederationRun(settings, "fed", lambda _: None).open(LABELS, 7)


def test_undelivered_results_of_a_finished_federation_hold_back_the_aggregator(tmp_path, tiny_bert) -> None:
    # Prepare: a finished federation whose MLflow (with a password in its URI) is unreachable
    unreachable = f"http://user:s3cret@127.0.0.1:{free_port()}"
    settings = settings_for(tmp_path, rounds=1, tracking_uri=unreachable)
    model, lines = build_model(str(tiny_bert), LABELS, 0), []
    with FederationRun(settings, "fed", lines.append) as ledger:
        ledger.open(LABELS, flat_size(model))
        ledger.track()
        ledger.record(1, flatten(model), metrics(0.5))
        ledger.close(model, load_tokenizer(str(tiny_bert)), flatten(model))
    # Execute / Assert: the aggregator must not start a new federation whose run would mix in the
    # old one's results; a simulation may (its results wait in their own outbox)
    with pytest.raises(FederationError, match="results still wait in") as refused:
        FederationRun(settings, "fed", lines.append).open(LABELS, flat_size(model), must_deliver=True)
    assert FederationRun(settings, "fed", lines.append).open(LABELS, flat_size(model)) == 1
    # the password is never shown
    assert "s3cret" not in str(refused.value) and not any("s3cret" in line for line in lines)
    assert any("user:***@127.0.0.1" in line for line in lines)


def test_keys_name_federations_and_only_a_lone_checkpoint_is_discarded(tmp_path, tiny_bert) -> None:
    settings = settings_for(tmp_path)
    # the aggregator's key is the settings' fingerprint; a simulation's differs from it, per parent run
    assert simulation_key(settings) != settings_fingerprint(settings)
    assert simulation_key(settings, "parent-1") != simulation_key(settings, "parent-2")
    assert simulation_key(settings.replace(device="cpu")) == simulation_key(settings)  # where it runs: no matter
    model = build_model(str(tiny_bert), LABELS, 0)
    for key in ("lone", "waiting"):
        with FederationRun(settings, key, lambda _: None) as ledger:
            ledger.open(LABELS, flat_size(model))
            ledger.track()
            ledger.record(1, flatten(model), metrics(0.5))
    (tmp_path / "ckpt" / "waiting" / "outbox.jsonl").write_text("{}\n")  # tracking data waiting for MLflow
    discard_finished(settings, "lone")
    discard_finished(settings, "waiting")
    assert not (tmp_path / "ckpt" / "lone").exists()
    assert (tmp_path / "ckpt" / "waiting" / "latest.pt").exists()
