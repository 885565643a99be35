import json
from pathlib import Path

import pytest

from fedsilo import join
from fedsilo.config import (
    LATER_KEYS,
    LOCAL_KEYS,
    agreed_settings,
    build_settings,
    fingerprint,
    load_settings,
    settings_fingerprint,
)
from fedsilo.errors import EX_CONFIG, ConfigError


def test_defaults_follow_the_paper() -> None:
    s = build_settings({"dataset": "x.csv"})
    assert (s.train.lr, s.train.batch_size, s.model.max_length, s.train.local_epochs) == (2e-5, 32, 128, 2)
    assert s.data.partition == "iid" and s.tracking.tracking_uri == "sqlite:///mlflow.db"


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: a.csv\nrounds: 5\nlocal-epochs: 3\n")
    s = load_settings(cfg, {"rounds": 7, "lr": None})
    assert (s.federation.rounds, s.train.local_epochs, s.data.dataset) == (7, 3, "a.csv")


def test_unknown_key_is_rejected_by_name(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: a.csv\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        load_settings(cfg, {})


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"rounds": 0}, "rounds"),
        ({"lr": -1}, "lr"),
        ({"partition": "random"}, "partition"),
        ({"aggregator": "nohost"}, "aggregator"),
        ({"silos": "many"}, "silos"),
    ],
)
def test_invalid_values_name_the_setting(flat: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid setting '{key}'"):
        build_settings({"dataset": "x.csv", **flat})


def test_bad_yaml_is_one_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_settings(cfg, {})


def test_labels_from_a_comma_list() -> None:
    assert build_settings({"dataset": "x", "labels": "neg, pos"}).data.labels == ["neg", "pos"]


def test_a_label_listed_twice_is_rejected() -> None:
    with pytest.raises(ConfigError, match="invalid setting 'labels'.*listed more than once: neg"):
        build_settings({"dataset": "x", "labels": "neg,pos,neg"})


def test_flag_values_are_validated_like_yaml_values() -> None:
    # options passes every non-boolean flag as text: pydantic parses and names it
    from typer.testing import CliRunner

    from fedsilo.cli import app

    result = CliRunner().invoke(app, ["silo", "--rank", "1", "--rounds", "many", "--dataset", "x.csv"])
    assert result.exit_code == EX_CONFIG
    assert "fedsilo: error: invalid setting 'rounds'" in result.output and "'many'" in result.output


def test_later_settings_at_their_defaults_keep_the_federations_name() -> None:
    # A federation started before these settings existed resumes: its fingerprint is the one they
    # had then (the agreed settings without them)
    s = build_settings({"dataset": "x.csv"})
    before = {k: v for k, v in s.flat().items() if k not in LOCAL_KEYS | LATER_KEYS}
    assert agreed_settings(s) == before
    assert settings_fingerprint(s) == fingerprint(json.dumps(before, sort_keys=True))
    # and any of them set otherwise is agreed, and names another federation
    for key, value in [
        ("optimizer", "adamw"),
        ("fedprox_mu", 0.01),
        ("head_init", "per-client"),
        ("server_optimizer", "fedavgm"),
        ("server_betas", "0.8,0.99"),
    ]:
        changed = s.replace(**{key: value})
        assert key in agreed_settings(changed) and settings_fingerprint(changed) != settings_fingerprint(s), key


def test_a_silo_with_another_optimiser_is_told_which() -> None:
    aggregator = build_settings({"dataset": "x.csv", "optimizer": "adamw", "lr": 1e-4})
    silo = aggregator.replace(optimizer="sgd")
    assert join.settings_difference(agreed_settings(aggregator), agreed_settings(silo)) == (
        "optimizer=default (aggregator: 'adamw')"
    )


def test_server_betas_from_a_comma_list() -> None:
    s = build_settings({"server_betas": "0.8, 0.95"})
    assert s.server.server_betas == (0.8, 0.95) and s.flat()["server_betas"] == [0.8, 0.95]


@pytest.mark.parametrize(
    "flat, expected",
    [
        ({"server_lr": 0}, "invalid setting 'server_lr': Input should be greater than 0 (got 0)"),
        ({"server_lr": -0.5}, "invalid setting 'server_lr': Input should be greater than 0"),
        (
            {"server_optimizer": "fedadam"},
            "invalid settings: server_optimizer fedadam needs server_lr (--server-lr): an adaptive server "
            "optimiser has no default step size",
        ),
        ({"server_optimizer": "fedyogi", "server_momentum": 0.5}, "server_optimizer fedyogi needs server_lr"),
        ({"fedprox_mu": -0.1}, "invalid setting 'fedprox_mu': Input should be greater than or equal to 0"),
        ({"warmup_ratio": 1}, "invalid setting 'warmup_ratio': Input should be less than 1 (got 1)"),
        ({"warmup_ratio": -0.1}, "invalid setting 'warmup_ratio': Input should be greater than or equal to 0"),
        ({"server_betas": "0.9,1"}, "invalid setting 'server_betas': Value error, each beta must be in [0, 1)"),
        ({"optimizer": "adam"}, "invalid setting 'optimizer': Input should be 'sgd' or 'adamw' (got 'adam')"),
    ],
)
def test_bad_optimiser_settings_are_one_clear_line(flat: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings({"dataset": "x.csv", **flat})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_adaptive_server_optimisers_run_with_an_explicit_server_lr() -> None:
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        assert build_settings({"server_optimizer": name, "server_lr": 0.01}).server.step_size == 0.01
    assert build_settings({"server_optimizer": "fedavgm"}).server.step_size == 1.0
