"""DP-SGD in the silos: the accountant's epsilon, calibration, clipping, the budget that ends a
federation, and the same epsilon in ``simulate`` and in a real federation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from mlflow.tracking import MlflowClient

from fedsilo import dp
from fedsilo import simulate as sim
from fedsilo.config import PrivacyConfig, build_settings
from fedsilo.model import bind_flat, build_classifier, build_model, load_tokenizer
from fedsilo.train import local_train, make_optimizer
from fedsilo.workload import silo_data
from tests.procs import assert_one_line_error, run
from tests.tiny import sentiment_rows, write_csv

TRAIN = {"batch_size": 16, "lr": 0.3, "local_epochs": 1, "seed": 3}


def google_rdp(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 1000), (0.8, 0.1, 60), (2.0, 0.25, 24)])
def test_epsilon_equals_google_dp_accounting_for_the_same_steps(sigma: float, q: float, steps: int) -> None:
    plan = dp.Plan(sigma, 1.0, q, steps // 4, 1e-5, "rdp", None)
    ours = plan.epsilon(4)  # four rounds of steps / 4
    assert ours == pytest.approx(google_rdp(sigma, q, 4 * (steps // 4), 1e-5), rel=0.01)
    assert plan.epsilon(0) == 0 and plan.epsilon(2) < ours  # it composes: more rounds, more epsilon


def test_calibration_spends_the_budget_by_the_last_planned_round() -> None:
    privacy = PrivacyConfig(dp_epsilon=8.0, dp_delta=1e-5)
    plan = dp.plan(privacy, examples=500, batch_size=16, epochs=2, rounds=5)
    assert plan.sample_rate == 16 / 500 and plan.steps_per_round == 2 * 31
    assert plan.epsilon(5) == pytest.approx(8.0, rel=0.01) and plan.allows(5)
    assert plan.rounds_allowed(10) == 5  # a sixth round would pass the budget


def test_a_fixed_sigma_with_a_budget_ends_the_federation_early_with_the_silo_named() -> None:
    plans = {
        1: dp.Plan(1.5, 1.0, 0.1, 10, 1e-5, "rdp", 4.0),  # the small silo spends fastest
        2: dp.Plan(1.5, 1.0, 0.02, 50, 1e-5, "rdp", 4.0),
    }
    end, why = dp.last_round(plans, rounds=20)
    assert 0 < end < 20
    assert plans[1].allows(end) and not plans[1].allows(end + 1)
    assert why is not None and why.startswith("silo 1's privacy budget (epsilon 4)") and f"round {end + 1}" in why


@pytest.fixture
def silo_one(tmp_path: Path, tiny_bert: Path, sentiment_csv: Path) -> Any:
    settings = build_settings({"model": str(tiny_bert), "dataset": str(sentiment_csv), "silos": 2, **TRAIN})
    data = silo_data(settings, 1, load_tokenizer(str(tiny_bert)))
    return settings, data


def fresh_model(settings: Any, labels: list[str]) -> torch.nn.Module:
    model = build_model(settings.model.model, labels, 0)
    for module in model.modules():  # no dropout: the two trainings below must be comparable exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_without_noise_or_clipping_dp_sgd_is_plain_full_batch_sgd(silo_one: Any) -> None:
    settings, data = silo_one
    n = len(data.train)
    # q = 1 (every example in every step), sigma = 0, C far above any gradient: nothing private is left
    plan = dp.Plan(0.0, 1e9, 1.0, 3, 1e-5, "rdp", None)
    private, plain = fresh_model(settings, data.labels), fresh_model(settings, data.labels)
    dp.private_train(private, data.train, plan, seed=(1,), make_optimizer=lambda p: make_optimizer(p, "sgd", 0.3, 0.0))
    local_train(plain, data.train, epochs=3, batch_size=n, lr=0.3, seed=(1,), fast_paths=False)
    assert torch.allclose(bind_flat(private), bind_flat(plain), atol=1e-6)


def lora_classifier(tiny_bert: Path, labels: list[str]) -> torch.nn.Module:
    settings = build_settings({"model": str(tiny_bert), "peft": "lora", "seed": 0})
    model = build_classifier(settings, labels, load_tokenizer(str(tiny_bert)))
    for module in model.modules():  # no dropout: the trainings below must be comparable exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_dp_sgd_on_lora_trains_the_adapters_alone_as_plain_sgd_does(silo_one: Any, tiny_bert: Path) -> None:
    settings, data = silo_one
    n = len(data.train)
    plan = dp.Plan(0.0, 1e9, 1.0, 2, 1e-5, "rdp", None)  # nothing private left: plain full-batch SGD
    private, plain = lora_classifier(tiny_bert, data.labels), lora_classifier(tiny_bert, data.labels)
    frozen = {k: v.clone() for k, v in private.named_parameters() if not v.requires_grad}
    dp.private_train(private, data.train, plan, seed=(1,), make_optimizer=lambda p: make_optimizer(p, "sgd", 0.3, 0.0))
    local_train(plain, data.train, epochs=2, batch_size=n, lr=0.3, seed=(1,), fast_paths=False)
    assert torch.allclose(bind_flat(private), bind_flat(plain), atol=1e-6)
    assert all(torch.equal(p, frozen[k]) for k, p in private.named_parameters() if not p.requires_grad)


def test_clipping_bounds_one_outlier_examples_pull(silo_one: Any, tiny_bert: Path) -> None:
    settings, data = silo_one
    # one example repeated with a flipped label carries a large gradient; q = 1, sigma = 0, C = 0.01
    plan = dp.Plan(0.0, 0.01, 1.0, 1, 1e-5, "rdp", None)
    model = fresh_model(settings, data.labels)
    before = bind_flat(model).clone()
    dp.private_train(model, data.train, plan, seed=(1,), make_optimizer=lambda p: make_optimizer(p, "sgd", 1.0, 0.0))
    step = float((bind_flat(model) - before).norm())
    # the average of n clipped gradients moves at most lr * C; unclipped, the same step is far larger
    unclipped = fresh_model(settings, data.labels)
    local_train(unclipped, data.train, epochs=1, batch_size=len(data.train), lr=1.0, seed=(1,), fast_paths=False)
    assert step <= 0.01 * (1 + 1e-4)
    assert float((bind_flat(unclipped) - before).norm()) > 10 * step


def six_rounds_of_dp(tmp_path: Path, tiny_bert: Path, rows: int, **privacy: Any) -> Any:
    """Settings of a 2-silo, 6-round simulation over ``rows`` sentiment rows, with ``privacy``."""
    data = write_csv(tmp_path / "reviews.csv", sentiment_rows(rows))
    return build_settings(
        {
            "model": str(tiny_bert),
            "dataset": str(data),
            "silos": 2,
            "rounds": 6,
            **TRAIN,
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "checkpoint_dir": str(tmp_path / "ckpt"),
            **privacy,
        }
    )


def test_simulate_stops_at_the_budget_and_logs_epsilon(tmp_path: Path, tiny_bert: Path) -> None:
    # Prepare: a fixed sigma that spends the budget in fewer rounds than planned
    settings = six_rounds_of_dp(tmp_path, tiny_bert, 160, dp_noise_multiplier=2.0, dp_epsilon=3.0)
    lines: list[str] = []
    # Execute
    sim.simulate(settings, lines.append)
    # Assert: it ended early, said why, and MLflow holds each client's epsilon within the budget
    (said,) = [line for line in lines if "privacy budget" in line]
    assert "the federation ends after round" in said
    end = int(said.rsplit(" ", 1)[1])
    assert 0 < end < 6
    # the round lines count to the round it ends after, with nothing left after it
    assert [line for line in lines if line.startswith("round ")][-1].startswith(f"round {end}/{end}: ")
    assert not [line for line in lines if line.startswith(f"round {end}/") and " left" in line]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (only,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    assert only.info.status == "FINISHED"
    history = client.get_metric_history(only.info.run_id, "dp_epsilon_max")
    assert [m.step for m in history] == list(range(1, end + 1))
    assert max(m.value for m in history) <= 3.0 and only.data.params["silo/1/dp_noise_multiplier"] == "2"


def test_with_skip_a_spent_silo_sits_out_while_the_other_goes_on(tmp_path: Path, tiny_bert: Path) -> None:
    # Prepare: unequal shards (dirichlet): the smaller silo samples a larger share of its rows per
    # step, so a fixed sigma spends its budget first
    settings = six_rounds_of_dp(
        tmp_path, tiny_bert, 240, partition="dirichlet", dirichlet_alpha=2.0, dp_noise_multiplier=1.5, dp_epsilon=5.0,
        dp_on_exhausted="skip",
    )  # fmt: skip
    lines: list[str] = []
    # Execute
    sim.simulate(settings, lines.append)
    # Assert: one silo sits out from some round on, named in one line; the federation goes on
    (said,) = [line for line in lines if "privacy budget" in line]
    assert "sits out from round" in said and "the federation ends" not in said
    spent_rank = int(said.split()[1].removesuffix("'s"))
    stops = int(said.rsplit(" ", 1)[1])
    assert 1 < stops <= 6
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (only,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
    run_id = only.info.run_id

    def history(name: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, name)}

    last = max(history("test_accuracy"))
    assert last > stops - 1  # the other silo trained on after the spent one stopped
    out = history("silos_sitting_out")
    assert [out[r] for r in sorted(out)] == [0.0] * (stops - 1) + [1.0] * (last - stops + 1)
    # the spent silo's epsilon stops growing at its last round and stays within its budget
    spent = history(f"silo/{spent_rank}/dp_epsilon")
    assert all(spent[r] == spent[stops - 1] for r in range(stops, last + 1)) and spent[stops - 1] <= 5.0
    other = history(f"silo/{3 - spent_rank}/dp_epsilon")
    assert other[last] > other[stops - 1] and max(other.values()) <= 5.0 * (1 + 1e-6)


def run_and_simulate(tmp_path: Path, flags: list[str]) -> dict[str, tuple[MlflowClient, str]]:
    """``fedsilo run`` and ``fedsilo simulate`` with ``flags``, each in its own folder: its store and run."""
    found = {}
    for mode in ("run", "simulate"):
        (tmp_path / mode).mkdir()
        result = run(mode, *flags, cwd=tmp_path / mode)
        assert result.returncode == 0, result.stdout + result.stderr
        client = MlflowClient(f"sqlite:///{tmp_path / mode}/mlflow.db")
        (only,) = client.search_runs([client.get_experiment_by_name("fedsilo").experiment_id])
        found[mode] = client, only.info.run_id
    return found


@pytest.mark.slow  # a real federation and a simulation, with DP-SGD: a minute
def test_a_federation_reports_the_epsilon_simulate_computes(tmp_path: Path, tiny_bert: Path) -> None:
    data = write_csv(tmp_path / "reviews.csv", sentiment_rows(160))
    flags = ["--silos", "2", "--rounds", "2", "--model", str(tiny_bert), "--dataset", str(data)]
    flags += ["--batch-size", "16", "--lr", "0.3", "--local-epochs", "1", "--seed", "3", "--dp-epsilon", "6"]
    epsilons = {
        mode: {k: v for k, v in client.get_run(run_id).data.metrics.items() if "dp_epsilon" in k}
        for mode, (client, run_id) in run_and_simulate(tmp_path, flags).items()
    }
    assert epsilons["run"] == epsilons["simulate"]
    assert epsilons["run"]["dp_epsilon_max"] == pytest.approx(6.0, rel=0.01)


@pytest.mark.slow  # a real federation and a simulation, with DP-SGD, six rounds
def test_a_federation_sits_a_spent_silo_out_as_simulate_does(tmp_path: Path, tiny_bert: Path) -> None:
    data = write_csv(tmp_path / "reviews.csv", sentiment_rows(240))
    flags = ["--silos", "2", "--rounds", "6", "--model", str(tiny_bert), "--dataset", str(data)]
    flags += ["--partition", "dirichlet", "--dirichlet-alpha", "2", "--batch-size", "16", "--lr", "0.3"]
    flags += ["--local-epochs", "1", "--seed", "3", "--dp-noise-multiplier", "1.5", "--dp-epsilon", "5"]
    flags += ["--dp-on-exhausted", "skip"]
    names = ("silos_sitting_out", "test_accuracy", "dp_epsilon_max", "silo/1/dp_epsilon", "silo/2/dp_epsilon")
    found = {
        mode: {name: [(m.step, round(m.value, 5)) for m in client.get_metric_history(run_id, name)] for name in names}
        for mode, (client, run_id) in run_and_simulate(tmp_path, flags).items()
    }
    assert found["run"] == found["simulate"]
    assert [v for _, v in found["run"]["silos_sitting_out"]][-1] == 1.0  # a silo sat out by the end


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--dp-epsilon", "0"], "dp_epsilon"),
        (["--dp-epsilon", "8", "--dp-delta", "1"], "dp_delta"),
        (["--dp-epsilon", "8", "--dp-max-grad-norm", "0"], "dp_max_grad_norm"),
        (["--dp-epsilon", "8", "--dp-delta", "0.1"], "must be below 1/n"),
        (["--dp-noise-multiplier", "1", "--dp-on-exhausted", "skip"], "needs a budget: add dp_epsilon (--dp-epsilon)"),
        (["--dp-epsilon", "8", "--gradient-checkpointing"], "no --gradient-checkpointing"),
    ],
)
def test_bad_privacy_values_are_one_line(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, flags: list[str], expected: str
) -> None:
    result = run(
        "simulate", "--model", str(tiny_bert), "--dataset", str(sentiment_csv), "--rounds", "1", *flags, cwd=tmp_path
    )
    assert result.returncode != 0
    assert_one_line_error(result.stderr, expected)
