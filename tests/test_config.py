from pathlib import Path

import pytest

from fedsilo.config import build_settings, load_settings
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
