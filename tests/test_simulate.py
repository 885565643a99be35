"""fedsilo.simulate: K clients in one process compute what the distributed federation computes."""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fedsilo import client as client_round
from fedsilo import simulate as sim
from fedsilo.cli import app
from fedsilo.config import Settings, build_settings
from fedsilo.errors import EX_CONFIG, FederationError
from fedsilo.model import build_model, flat_size, load_tokenizer
from fedsilo.train import local_train
from fedsilo.workload import client_shards
from tests.mlmodels import model_weights_dir
from tests.procs import final_weights, run
from tests.reference import flatten, weighted_average

TRAIN = {"batch_size": 16, "lr": 0.3, "local_epochs": 2, "seed": 3}
TRAIN_FLAGS = ["--batch-size", "16", "--lr", "0.3", "--local-epochs", "2", "--seed", "3"]


def settings_for(work: Path, model: Path, data: Path, **changes: Any) -> Settings:
    return build_settings(
        {
            "model": str(model),
            "dataset": str(data),
            "silos": 2,
            "rounds": 2,
            **TRAIN,
            "tracking_uri": f"sqlite:///{work}/mlflow.db",
            "checkpoint_dir": str(work / "ckpt"),
            **changes,
        }
    )


def only_run(work: Path) -> Any:
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    return client, found


def local_model(settings: Settings, k: int, round_: int = 1) -> tuple[torch.Tensor, int]:
    """Client k's weights after one round of training from the initial model, computed alone."""
    tokenizer = load_tokenizer(settings.model.model)
    shards, _, labels = client_shards(settings, tokenizer, settings.federation.silos)
    model = build_model(settings.model.model, labels, settings.train.seed)
    t = settings.train
    local_train(model, shards[k - 1], epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, seed=(t.seed, k, round_))
    return flatten(model), len(shards[k - 1])


@pytest.fixture(scope="module")
def simulated(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_csv: Path
) -> tuple[Path, sim.Outcome, list[str]]:
    """Two clients, two rounds, in process; shared by several tests."""
    work = tmp_path_factory.mktemp("simulated")
    lines: list[str] = []
    outcome = sim.simulate(settings_for(work, tiny_bert, sentiment_csv), lines.append)
    return work, outcome, lines


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast-paths", "no-fast-paths"])
def test_simulate_gives_the_distributed_federations_model(
    fast_paths, simulated, tmp_path, tiny_bert, sentiment_csv
) -> None:
    # Prepare: the same federation in process (the shared one has the fast paths on), and as
    # three processes over gloo
    outcome = (
        simulated[1]
        if fast_paths
        else sim.simulate(settings_for(tmp_path / "sim", tiny_bert, sentiment_csv, fast_paths=False), lambda line: None)
    )
    switch = "--fast-paths" if fast_paths else "--no-fast-paths"
    result = run(
        "run",
        "--silos",
        "2",
        "--rounds",
        "2",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        *TRAIN_FLAGS,
        switch,
        "--checkpoint-dir",
        "ckpt",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Assert
    distributed = final_weights(tmp_path / "ckpt")
    difference = (outcome.weights - distributed).abs()
    assert difference.max() <= 1e-5
    assert (difference / distributed.abs().clamp_min(1e-3)).max() <= 1e-5
    initial = flatten(build_model(str(tiny_bert), ["neg", "pos"], 3))
    assert (outcome.weights - initial).abs().max() > 1e-3  # it did train


def test_simulate_logs_like_the_aggregator(simulated, tiny_bert, sentiment_csv) -> None:
    work, outcome, lines = simulated
    client, found = only_run(work)
    assert found.info.run_id == outcome.run_id and found.info.status == "FINISHED"
    assert found.data.params["silos"] == "2" and found.data.params["num_labels"] == "2"
    # the report's floor: the share of the test set's most frequent label
    _, test, _ = client_shards(settings_for(work, tiny_bert, sentiment_csv), load_tokenizer(str(tiny_bert)), 2)
    most = Counter(test.labels.tolist()).most_common(1)[0][1]
    assert float(found.data.params["test_majority_accuracy"]) == pytest.approx(most / len(test), abs=1e-6)
    assert {
        "test_accuracy",
        "test_loss",
        "train_loss",
        "round_seconds",
        "silo/1/train_loss",
        "silo/2/train_loss",
        "silo/1/train_seconds",
    } <= set(found.data.metrics)
    assert int(found.data.params["silo/1/examples"]) + int(found.data.params["silo/2/examples"]) == 216
    history = client.get_metric_history(outcome.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2] and history[-1].value == outcome.final_accuracy
    # one progress line per round, and the final model as a loadable artifact
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 1/2", "round 2/2"]
    from transformers import AutoModelForSequenceClassification

    model_dir = model_weights_dir(f"sqlite:///{work}/mlflow.db", outcome.run_id, work / "download")
    assert torch.equal(flatten(AutoModelForSequenceClassification.from_pretrained(model_dir)), outcome.weights)


def test_one_running_sum_whatever_the_number_of_clients(monkeypatch, tmp_path, tiny_bert, sentiment_csv) -> None:
    # Prepare: watch every contribution: which buffers it uses, and how many model-sized
    # tensors are alive at that moment
    n = flat_size(build_model(str(tiny_bert), ["neg", "pos"], 0))
    seen: dict[int, dict[str, Any]] = {}
    real_take = sim.take_update

    def model_sized() -> int:
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter) and o.numel() == n)

    def watching(summed, local, reference, examples, rows=()):
        record = seen[current]
        record["buffers"].add((summed.data_ptr(), local.data_ptr(), reference.data_ptr()))
        record["alive"] = max(record["alive"], model_sized() - record["before"])
        record["calls"] += 1
        record["rows"] += len(rows)
        return real_take(summed, local, reference, examples, rows)

    monkeypatch.setattr(sim, "take_update", watching)
    # Execute
    for current in (2, 6):
        seen[current] = {"buffers": set(), "alive": 0, "calls": 0, "rows": 0, "before": model_sized()}
        sim.simulate(
            settings_for(
                tmp_path, tiny_bert, sentiment_csv, silos=current, rounds=2, local_epochs=1, experiment=f"k{current}"
            ),
            lambda line: None,
        )
    # Assert: every client of every round trains in the same flat vector (the model's own) and
    # adds to the same running sum, and six clients hold no more model-sized tensors than two
    # (the model's vector, the global model, the sum)
    assert seen[2]["calls"] == 4 and seen[6]["calls"] == 12
    assert len(seen[2]["buffers"]) == 1 and len(seen[6]["buffers"]) == 1
    assert seen[6]["alive"] == seen[2]["alive"] == 3
    # and the word-embedding table, whose rows few of a client's tokens reach, is skipped but
    # for those rows: the tiny model's vocabulary holds far more tokens than a shard uses
    assert seen[2]["rows"] >= 4 and seen[6]["rows"] >= 12


@pytest.mark.parametrize("partition", ["iid", "label-sorted", "dirichlet"])
def test_each_partition_scheme(partition, tmp_path, tiny_bert, sentiment_csv) -> None:
    settings = settings_for(
        tmp_path, tiny_bert, sentiment_csv, rounds=1, local_epochs=1, partition=partition, dirichlet_alpha=1.0
    )
    outcome = sim.simulate(settings, lambda line: None)
    _, found = only_run(tmp_path)
    shards, _, _ = client_shards(settings, load_tokenizer(str(tiny_bert)), 2)
    logged = [int(found.data.params[f"silo/{k}/examples"]) for k in (1, 2)]
    assert logged == [len(s) for s in shards] and sum(logged) == 216
    if partition == "label-sorted":  # contiguous shards of label-sorted rows: the authors' non-IID split
        assert set(shards[0].labels.tolist()) == {0} and shards[1].labels.mean() > 0.9
    if partition == "dirichlet":
        assert logged[0] != logged[1]
    assert found.data.params["partition"] == partition and 0.0 <= outcome.final_accuracy <= 1.0


def test_without_attention_mask_pads_to_max_length_and_changes_the_model(
    monkeypatch, tmp_path, tiny_bert, sentiment_csv
) -> None:
    widths: list[int] = []
    real_local_train = client_round.local_train

    def recording(model, data, **kw):
        forward = model.forward

        def spy(**batch):
            widths.append(batch["input_ids"].shape[1])
            assert "attention_mask" not in batch
            return forward(**batch)

        model.forward = spy
        try:
            return real_local_train(model, data, **kw)
        finally:
            del model.forward

    monkeypatch.setattr(client_round, "local_train", recording)
    common = {"rounds": 1, "local_epochs": 1, "max_length": 24}
    without = sim.simulate(
        settings_for(tmp_path / "a", tiny_bert, sentiment_csv, attention_mask=False, **common), lambda line: None
    )
    assert widths and set(widths) == {24}
    monkeypatch.setattr(client_round, "local_train", real_local_train)
    with_mask = sim.simulate(settings_for(tmp_path / "b", tiny_bert, sentiment_csv, **common), lambda line: None)
    assert (without.weights - with_mask.weights).abs().max() > 1e-6


def test_interrupted_simulation_resumes_its_run_and_model(monkeypatch, tmp_path, tiny_bert, sentiment_csv) -> None:
    # Prepare: the uninterrupted result
    whole = sim.simulate(settings_for(tmp_path / "whole", tiny_bert, sentiment_csv, local_epochs=1), lambda line: None)
    settings = settings_for(tmp_path / "cut", tiny_bert, sentiment_csv, local_epochs=1)
    real_evaluate = sim.evaluate
    calls = []

    def stop_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sim, "evaluate", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        sim.simulate(settings, lambda line: None)
    monkeypatch.setattr(sim, "evaluate", real_evaluate)
    # Execute
    lines: list[str] = []
    resumed = sim.simulate(settings, lines.append)
    # Assert: the same model as without the interruption, logged into the same MLflow run
    assert any(line.startswith("resuming after round 1") for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 2/2"]
    assert torch.allclose(resumed.weights, whole.weights, rtol=0, atol=1e-6)
    client, found = only_run(tmp_path / "cut")
    assert found.info.run_id == resumed.run_id and found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.run_id, "test_accuracy")] == [1, 2]


def poison_client_2(monkeypatch) -> None:
    real_local_train = client_round.local_train

    def poisoned(model, data, **kw):
        result = real_local_train(model, data, **kw)
        if kw["seed"][1] == 2:  # diverged: NaN in what training reached (the classifier, not unused embedding rows)
            with torch.no_grad():
                list(model.parameters())[-1].fill_(float("nan"))
        return result

    monkeypatch.setattr(client_round, "local_train", poisoned)


def test_a_skipped_update_leaves_the_sum(monkeypatch, tmp_path, tiny_bert, sentiment_csv) -> None:
    poison_client_2(monkeypatch)
    settings = settings_for(tmp_path, tiny_bert, sentiment_csv, silos=3, rounds=1, local_epochs=1, update_policy="skip")
    lines: list[str] = []
    outcome = sim.simulate(settings, lines.append)
    assert "skipping an update: silo 2 sent a non-finite update in round 1" in lines
    (w1, n1), (w3, n3) = local_model(settings, 1), local_model(settings, 3)
    expected = weighted_average([w1, w3], [n1, n3])
    assert torch.isfinite(outcome.weights).all()
    assert (outcome.weights - expected).abs().max() <= 1e-5
    _, found = only_run(tmp_path)
    assert found.data.metrics["silos_skipped"] == 1.0


def test_a_bad_update_stops_the_simulation_by_default(monkeypatch, tmp_path, tiny_bert, sentiment_csv) -> None:
    poison_client_2(monkeypatch)
    with pytest.raises(FederationError, match="silo 2 sent a non-finite update in round 1"):
        sim.simulate(settings_for(tmp_path, tiny_bert, sentiment_csv, rounds=1, local_epochs=1), lambda line: None)
    _, found = only_run(tmp_path)
    assert found.info.status == "FAILED"


def test_cli_clients_override_silos_and_bad_input_is_one_line(tmp_path, monkeypatch, tiny_bert, sentiment_csv) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "simulate",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--silos",
        "5",
        "--clients",
        "3",
        "--rounds",
        "1",
        *TRAIN_FLAGS,
        "--local-epochs",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "round 1/1: test_accuracy=" in result.output
    _, found = only_run(tmp_path)
    assert found.data.params["silos"] == "3" and "silo/3/examples" in found.data.params

    bad = CliRunner().invoke(app, [*args, "--partition", "none"])
    assert bad.exit_code == EX_CONFIG and "Traceback" not in bad.output
    assert bad.stderr.strip().splitlines() == [
        (
            "fedsilo: error: simulate splits one --dataset among the clients: choose --partition iid, "
            "label-sorted or dirichlet (none means each silo brings its own data)"
        )
    ]

    no_clients = CliRunner().invoke(app, [*args, "--clients", "0"])
    assert no_clients.exit_code == EX_CONFIG and "Traceback" not in no_clients.output
    assert no_clients.stderr.strip().splitlines() == [
        "fedsilo: error: invalid setting 'silos': Input should be greater than or equal to 1 (got '0')"
    ]  # as typed


# -- optimisers ----------------------------------------------------------------------------------------
# Every option of the local and server optimisers away from FedAvg's at once: what the silos and the
# aggregator of `fedsilo run` must compute as the simulation does.
OPTIMISERS = {
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.01,
    "lr_schedule": "cosine",
    "warmup_ratio": 0.2,
    "fedprox_mu": 0.1,
    "head_init": "per-client",
    "server_optimizer": "fedadam",
    "server_lr": 0.05,
}


def test_fedavg_with_server_lr_1_and_fedprox_mu_0_is_the_same_federation_bit_for_bit(
    simulated, tmp_path, tiny_bert, sentiment_csv
) -> None:
    settings = settings_for(
        tmp_path, tiny_bert, sentiment_csv, server_optimizer="fedavg", server_lr=1.0, fedprox_mu=0.0, optimizer="sgd"
    )
    outcome = sim.simulate(settings, lambda line: None)
    assert torch.equal(outcome.weights, simulated[1].weights)


def test_optimisers_in_simulate_give_the_distributed_federations_model(tmp_path, tiny_bert, sentiment_csv) -> None:
    # Prepare: one round of the federation in process, and as three processes over gloo.
    # AdamW divides a gradient by its own size: where the gradient is zero but for rounding
    # (attention key biases, which the softmax ignores) it steps by the rounding. So the simulation
    # runs on one thread, as each silo does (tests.procs: OMP_NUM_THREADS=1), for the same rounding,
    # and one round: in a second, the last bit in which a sum over the wire and a running sum can
    # differ would become such a step. Later rounds are the simulation's (resume test below) and the
    # server optimiser's (tests/test_server_opt.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = sim.simulate(
            settings_for(tmp_path / "sim", tiny_bert, sentiment_csv, rounds=1, local_epochs=1, **OPTIMISERS),
            lambda line: None,
        )
    finally:
        torch.set_num_threads(threads)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TRAIN, "local_epochs": 1, **OPTIMISERS}.items()]
    result = run(
        "run",
        "--silos",
        "2",
        "--rounds",
        "1",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        *flags,
        "--checkpoint-dir",
        "ckpt",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Assert: the same model, and the server optimiser's state kept beside it
    distributed = final_weights(tmp_path / "ckpt")
    difference = (outcome.weights - distributed).abs()
    assert difference.max() <= 1e-5
    assert (difference / distributed.abs().clamp_min(1e-3)).max() <= 1e-5
    (path,) = (tmp_path / "ckpt").glob("*/latest.pt")
    assert set(torch.load(path, weights_only=True)["server_state"]) == {"m", "v"}
    # and every option is a param of the MLflow run
    _, found = only_run(tmp_path / "sim")
    params = found.data.params
    assert {k: params[k] for k in OPTIMISERS} == {k: str(v) for k, v in OPTIMISERS.items()}
    assert params["server_betas"] == "[0.9, 0.99]" and params["server_tau"] == "0.001"


def test_an_interrupted_federation_with_optimisers_resumes_exactly(
    monkeypatch, tmp_path, tiny_bert, sentiment_csv
) -> None:
    # Prepare: the uninterrupted result; then a run stopped in round 2
    common = {"local_epochs": 1, **OPTIMISERS}
    whole = sim.simulate(settings_for(tmp_path / "whole", tiny_bert, sentiment_csv, **common), lambda line: None)
    settings = settings_for(tmp_path / "cut", tiny_bert, sentiment_csv, **common)
    real_evaluate = sim.evaluate
    calls = []

    def stop_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sim, "evaluate", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        sim.simulate(settings, lambda line: None)
    monkeypatch.setattr(sim, "evaluate", real_evaluate)
    # Execute
    lines: list[str] = []
    resumed = sim.simulate(settings, lines.append)
    # Assert: round 2 alone, from the checkpoint's model and server state, at the schedule's place
    assert any(line.startswith("resuming after round 1") for line in lines)
    assert torch.allclose(resumed.weights, whole.weights, rtol=0, atol=1e-6)


def test_each_client_starts_round_1_with_its_own_head(monkeypatch, tmp_path, tiny_bert, sentiment_csv) -> None:
    # Prepare: note the model each client starts training from
    entries: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    real_local_train = client_round.local_train

    def noting(model, data, **kw):
        _, k, round_ = kw["seed"]
        entries[current][(k, round_)] = flatten(model)
        return real_local_train(model, data, **kw)

    monkeypatch.setattr(client_round, "local_train", noting)
    outcomes = {}
    for current in ("shared", "per-client"):
        entries[current] = {}
        settings = settings_for(tmp_path / current, tiny_bert, sentiment_csv, local_epochs=1, head_init=current)
        outcomes[current] = sim.simulate(settings, lambda line: None)
    # Assert: per-client heads differ in round 1 (the classifier: the last 2 x 33 values), the
    # body is the same; round 2 starts everyone from the global model; shared is one model throughout
    head = slice(-66, None)
    body = slice(0, -66)
    own = entries["per-client"]
    assert not torch.equal(own[(1, 1)][head], own[(2, 1)][head])
    assert torch.equal(own[(1, 1)][body], own[(2, 1)][body])
    assert torch.equal(own[(1, 2)], own[(2, 2)])
    shared = entries["shared"]
    assert torch.equal(shared[(1, 1)], shared[(2, 1)]) and torch.equal(shared[(1, 2)], shared[(2, 2)])
    assert torch.equal(shared[(1, 1)][body], own[(1, 1)][body])
    assert not torch.equal(outcomes["shared"].weights, outcomes["per-client"].weights)
