"""What a federation leaves in MLflow, read back from a real store (sqlite in a temporary folder):
the model as an MLflow model, the registry, what a run says about itself, system metrics, and
where the artifacts go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from fedsilo.averaging import Report
from fedsilo.config import build_settings
from fedsilo.launcher import free_port
from fedsilo.ledger import Outcome
from fedsilo.runmeta import RunContext, content_digest, data_inputs, run_name, short_name
from fedsilo.simulate import simulate
from fedsilo.tracking import artifact_location, round_metrics
from fedsilo.train import EvalResult
from tests.procs import environment, run

REGISTERED = "fedsilo-sentiment"
EXPERIMENT = "mlflow-model"


def settings_for(root: Path, model: Path, data: Path, seed: int) -> Any:
    return build_settings(
        {
            "model": str(model),
            "dataset": str(data),
            "silos": 2,
            "rounds": 1,
            "local_epochs": 1,
            "batch_size": 16,
            "lr": 0.3,
            "seed": seed,
            "tracking_uri": f"sqlite:///{root}/store/mlflow.db",
            "experiment": EXPERIMENT,
            "checkpoint_dir": str(root / "ckpt"),
            "register_model": REGISTERED,
        }
    )


class Federations:
    def __init__(self, root: Path, cwd: Path, uri: str, outcomes: list[Outcome], lines: list[str]) -> None:
        self.root, self.cwd, self.uri, self.outcomes, self.lines = root, cwd, uri, outcomes, lines
        self.client = MlflowClient(tracking_uri=uri)

    def run(self, index: int = 0) -> Any:
        run_id = self.outcomes[index].run_id
        assert run_id is not None
        return self.client.get_run(run_id)


@pytest.fixture(scope="module")
def federations(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_csv: Path
) -> Iterator[Federations]:
    """Two simulated federations (seeds 0 and 1) registering their models, started from an empty
    working directory, with system metrics sampled often enough for a run of seconds."""
    root = tmp_path_factory.mktemp("mlflow-model")
    cwd = root / "cwd"
    cwd.mkdir()
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        outcomes = [simulate(settings_for(root, tiny_bert, sentiment_csv, seed), lines.append) for seed in (0, 1)]
    yield Federations(root, cwd, f"sqlite:///{root}/store/mlflow.db", outcomes, lines)


@pytest.fixture
def fluent(federations: Federations, monkeypatch: pytest.MonkeyPatch) -> Federations:
    """MLflow's process-wide API (pyfunc, the registry's models:/ URIs) pointed at the store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", federations.uri)
    return federations


def test_the_final_model_loads_with_pyfunc_and_predicts_label_names(fluent: Federations) -> None:
    import mlflow

    run_id = fluent.outcomes[0].run_id
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    predictions = model.predict(["a great and moving film", "a dull and tedious film"])
    assert list(predictions.columns) == ["label", "score"]
    assert set(predictions["label"]) <= {"neg", "pos"}
    assert ((predictions["score"] > 0) & (predictions["score"] <= 1)).all()
    signature = model.metadata.signature
    assert signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert [c["name"] for c in signature.outputs.to_dict()] == ["label", "score"]


def test_the_final_model_loads_as_a_transformers_pipeline_with_the_global_weights(fluent: Federations) -> None:
    import mlflow
    import torch

    from tests.reference import flatten

    run_id = fluent.outcomes[0].run_id
    classifier = mlflow.transformers.load_model(f"runs:/{run_id}/model")
    assert classifier.task == "text-classification"
    assert classifier.model.config.id2label == {0: "neg", 1: "pos"}
    assert torch.equal(flatten(classifier.model), fluent.outcomes[0].weights)
    assert classifier("a charming film")[0]["label"] in {"neg", "pos"}


def test_each_federation_registers_a_new_version(fluent: Federations) -> None:
    versions = fluent.client.search_model_versions(f"name = '{REGISTERED}'")
    assert sorted((int(v.version), v.run_id) for v in versions) == [
        (1, fluent.outcomes[0].run_id),
        (2, fluent.outcomes[1].run_id),
    ]
    assert f"registered the model as {REGISTERED} version 2" in fluent.lines
    import mlflow

    latest = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/2")
    assert set(latest.predict(["fresh"])["label"]) <= {"neg", "pos"}


def test_the_run_says_what_it_is(federations: Federations, tiny_bert: Path, sentiment_csv: Path) -> None:
    run = federations.run()
    tags, params = run.data.tags, run.data.params
    # name, description, code and libraries
    assert run.info.run_name == f"K=2 {tiny_bert.name} sentiment seed=0"
    assert tags["mlflow.note.content"].startswith(f"Federated Averaging of {tiny_bert.name} ({tiny_bert}) over K=2")
    assert tags["fedsilo.version"] and tags["fedsilo.mode"] == "simulate"
    assert {"versions.torch", "versions.transformers", "versions.mlflow", "versions.python"} <= set(tags)
    # the model by short name and by what was given; what "auto" resolved to
    assert (params["model"], params["model_path"]) == (tiny_bert.name, str(tiny_bert))
    assert (params["device"], params["device_used"]) == ("auto", "cpu")
    assert int(params["silo/1/examples"]) + int(params["silo/2/examples"]) == int(params["train_examples"])
    # the dataset as an input: digest and sizes
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "sentiment" and used.dataset.digest == content_digest(str(sentiment_csv))
    assert json.loads(used.dataset.profile) == {
        "training_examples": int(params["train_examples"]),
        "test_examples": int(params["test_examples"]),
    }
    assert {(t.key, t.value) for t in used.tags} == {("mlflow.data.context", "training")}


def test_metrics_federation_first_then_each_silo_under_one_prefix(federations: Federations) -> None:
    metrics = set(federations.run().data.metrics)
    federation = {m for m in metrics if "/" not in m}
    assert {
        "test_accuracy",
        "test_loss",
        "train_loss",
        "round_seconds",
        "silos_skipped",
        "silos_sitting_out",
        "local_steps",
    } == federation
    silos = {m for m in metrics if m.startswith("silo/")}
    assert silos == {f"silo/{k}/{name}" for k in (1, 2) for name in ("train_loss", "train_seconds")}
    assert not any(m.endswith("/examples") for m in metrics)  # constants are params


def test_system_metrics_are_recorded(federations: Federations) -> None:
    metrics = federations.run().data.metrics
    assert any(m.startswith("system/cpu_utilization_percentage") for m in metrics), sorted(metrics)


def test_artifacts_sit_beside_the_database_and_nothing_in_the_working_directory(federations: Federations) -> None:
    experiment = federations.client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == (federations.root / "store" / "mlartifacts" / EXPERIMENT).as_uri()
    assert list(federations.cwd.iterdir()) == []
    assert any((federations.root / "store" / "mlartifacts" / EXPERIMENT).rglob("MLmodel"))


def test_artifact_location_is_beside_a_sqlite_database_only(tmp_path: Path) -> None:
    assert (
        artifact_location(f"sqlite:///{tmp_path}/a/m.db", "my exp/1") == (tmp_path / "a/mlartifacts/my_exp_1").as_uri()
    )
    assert artifact_location("sqlite:///m.db?timeout=5", "x") == (Path.cwd() / "mlartifacts" / "x").as_uri()
    assert artifact_location("http://127.0.0.1:5000", "x") is None
    assert artifact_location("sqlite:///:memory:", "x") is None


def test_short_names_and_run_names() -> None:
    assert short_name("data/minilm") == "minilm"
    assert short_name("data/minilm/") == "minilm"
    assert short_name("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert short_name("data/rotten_tomatoes.csv") == "rotten_tomatoes"
    assert short_name("stanfordnlp/imdb") == "imdb"
    settings = build_settings({"model": "data/minilm", "dataset": "data/rotten_tomatoes.csv", "silos": 4})
    assert run_name(settings) == "K=4 minilm rotten_tomatoes seed=0"


def test_private_silo_data_is_no_input_of_the_aggregators_run(tmp_path: Path) -> None:
    test = tmp_path / "test.csv"
    test.write_text("text,label\na,x\n", encoding="utf-8")
    settings = build_settings({"partition": "none", "dataset": "mine.csv", "test_dataset": str(test)})
    context = RunContext("aggregator", "cpu", "gloo", {1: 10, 2: 20}, 1)
    (only,) = data_inputs(settings, context)
    assert (only.name, only.context, json.loads(only.profile)) == ("test", "test", {"test_examples": 1})
    assert data_inputs(settings.replace(test_dataset=None), RunContext("aggregator", "cpu", "gloo", {1: 10})) == []


def test_round_metrics_log_each_silos_own_evaluation_where_silos_evaluate() -> None:
    reports = [Report(1, 10, 0.5, 1.0, 2.5, 4), Report(2, 30, 0.7, 1.0, 3.5, 8), Report(3, 50, 0.7, 9.0, 3.5, 14)]
    local = {1: EvalResult(4, 2.0, 3), 2: EvalResult(6, 3.0, 3)}
    metrics = round_metrics(EvalResult(10, 5.0, 6), reports, [1, 2], ["silo 3: too large"], 9.0, local)
    assert metrics["train_loss"] == pytest.approx(0.65)
    # side by side, the round lasts as long as the accepted silo with the most steps (silo 3 sat out)
    assert metrics["local_steps"] == 8
    assert (metrics["silo/2/train_seconds"], metrics["silo/1/test_accuracy"], metrics["silo/2/test_accuracy"]) == (
        3.5,
        0.75,
        0.5,
    )


def test_the_cli_run_leaves_nothing_in_the_working_directory_and_keeps_the_console_quiet(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    # Prepare: an empty working directory and a store elsewhere
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    store = tmp_path / "store" / "m.db"
    store.parent.mkdir()

    # Execute
    result = run(
        "simulate",
        *("--clients", "2", "--rounds", "1", "--local-epochs", "1", "--batch-size", "16"),
        *("--model", str(tiny_bert), "--dataset", str(sentiment_csv)),
        *("--tracking-uri", f"sqlite:///{store}", "--checkpoint-dir", str(tmp_path / "ckpt")),
        cwd=cwd,
    )

    # Assert
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert list(cwd.iterdir()) == []
    assert (store.parent / "mlartifacts").is_dir()
    assert " INFO " not in output and "INFO mlflow" not in output, output
    assert output.count("mlflow ui") == 1, output  # the hint to browse the run, once, at the end


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_label_names(fluent: Federations, tmp_path: Path) -> None:
    # Prepare: serve the registered model locally, in this environment (no virtualenv or conda)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED}/1"]
        + ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        # The scoring server execs `uvicorn` from PATH: this environment's, as an activated venv has it.
        env=environment(
            MLFLOW_TRACKING_URI=fluent.uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            time.sleep(1)

        # Execute
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": ["a great film", "a boring film"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = json.loads(answer.read())

        # Assert
        predictions = body["predictions"]
        assert len(predictions) == 2 and {p["label"] for p in predictions} <= {"neg", "pos"}, body
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9",  # a closed port: refused at once
        "https://10.255.255.1",  # a black hole: the probe's own timeout
    ],
)
def test_a_hub_id_without_a_network_fails_in_seconds_with_a_hint(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no HF_HUB_OFFLINE, an empty cache, and a hub that cannot be reached
    from fedsilo import hub
    from fedsilo.errors import ModelError
    from fedsilo.model import build_model, load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub.reachable.cache_clear()
    monkeypatch.setattr(hub, "_went_offline", False)  # what an earlier test's probe found

    # Execute / Assert: the tokenizer and the model alike. Each loader first fails once on a missing
    # local directory, which needs no network: its imports (seconds on a loaded machine) are then
    # paid, and what is timed is what the hub id adds: the probe, then the cache, no retries.
    for load, warm_up in (
        (lambda: load_tokenizer("nonexistent-org/nope"), lambda: load_tokenizer(str(tmp_path / "absent"))),
        (
            lambda: build_model("nonexistent-org/nope", ["a", "b"], 0),
            lambda: build_model(str(tmp_path / "absent"), ["a", "b"], 0),
        ),
    ):
        with pytest.raises(ModelError):
            warm_up()
        started = time.monotonic()
        with pytest.raises(ModelError, match="unreachable from here.*HF_HUB_OFFLINE=1") as caught:
            load()
        assert time.monotonic() - started < 2 * hub.PROBE_SECONDS + 5
        assert "\n" not in str(caught.value) and "nonexistent-org/nope" in str(caught.value)
