"""The command line of the settings: one option per field, typed by it, and the precedence of the
three layers (YAML file < FEDSILO_* variable < flag). Bad values and usage errors are one line.

These run the real ``fedsilo`` app in-process (CliRunner); ``fedsilo run`` stands for every command
that takes settings, with its launcher replaced so that nothing starts.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fedsilo import __version__
from fedsilo.cli import app
from fedsilo.commands import run as run_command
from fedsilo.config import SECTIONS, Settings, build_settings
from fedsilo.errors import EX_CONFIG
from fedsilo.options import settings_options, settings_parameters

FIELDS = {key: (name, field) for name, section in SECTIONS.items() for key, field in section.model_fields.items()}


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[Settings, int]]:
    """What ``fedsilo run`` would launch: (settings, restarts) per invocation."""
    monkeypatch.chdir(tmp_path)
    launched: list[tuple[Settings, int]] = []
    monkeypatch.setattr(run_command, "run_local", lambda settings, restarts: launched.append((settings, restarts)))
    return launched


def fedsilo(*args: str, **env: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def one_error_line(result: Result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: "), result.output
    return lines[0]


# -- one option per field ---------------------------------------------------------------------------
def test_every_setting_has_its_flag_variable_panel_and_help() -> None:
    params = {p.name: p for p in settings_parameters()}
    assert list(params) == ["config", *FIELDS]
    assert params["config"].envvar == "FEDSILO_CONFIG"
    for key, (section, field) in FIELDS.items():
        option = params[key]
        assert option.opts == ["--" + key.replace("_", "-")], key
        assert option.envvar == f"FEDSILO_{key.upper()}", key
        assert option.rich_help_panel == section.capitalize(), key
        assert option.help.startswith(field.description), key
        if field.annotation is bool:
            assert option.secondary_opts == ["--no-" + key.replace("_", "-")], key


def test_every_setting_option_is_typed_as_its_field() -> None:
    hints = typing.get_type_hints(settings_options)
    for key, (_, field) in FIELDS.items():
        # labels, server_betas: one comma-separated value on the command line, which the field splits
        expected = str | None if key in ("labels", "server_betas", "lora_target_modules") else field.annotation | None
        assert hints[key] == expected, key


# -- precedence: YAML < FEDSILO_* < flag ---------------------------------------------------------------
@pytest.mark.parametrize(
    "key, yaml_text, env_value, flag, expected",
    [
        ("rounds", "rounds: 3", "4", ["--rounds", "5"], (3, 4, 5)),
        ("attention_mask", "attention_mask: false", "true", ["--no-attention-mask"], (False, True, False)),
        ("labels", "labels: [a, b]", "c,d", ["--labels", "e,f"], (["a", "b"], ["c", "d"], ["e", "f"])),
    ],
    ids=["int", "bool", "list"],
)
def test_a_variable_beats_the_file_and_a_flag_beats_both(
    key: str, yaml_text: str, env_value: str, flag: list[str], expected: tuple, resolved, tmp_path: Path
) -> None:
    (tmp_path / "fedsilo.yaml").write_text(f"dataset: a.csv\n{yaml_text}\n")
    env = {f"FEDSILO_{key.upper()}": env_value}
    for result in (
        fedsilo("run", "--config", "fedsilo.yaml"),
        fedsilo("run", "--config", "fedsilo.yaml", **env),
        fedsilo("run", "--config", "fedsilo.yaml", *flag, **env),
    ):
        assert result.exit_code == 0, result.output
    assert tuple(settings.flat()[key] for settings, _ in resolved) == expected


def test_unset_options_leave_the_defaults(resolved) -> None:
    assert fedsilo("run", "--dataset", "a.csv").exit_code == 0
    ((settings, restarts),) = resolved
    assert settings == build_settings({"dataset": "a.csv"})
    assert restarts == 0


def test_a_commands_own_option_is_typed(resolved) -> None:
    assert fedsilo("run", "--dataset", "a.csv", "--restarts", "2").exit_code == 0
    assert fedsilo("run", "--dataset", "a.csv", FEDSILO_RESTARTS="3").exit_code == 0
    assert [restarts for _, restarts in resolved] == [2, 3]


# -- bad values: one line, exit 1, nothing started -----------------------------------------------------
@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["silo", "--rank", "x"], {}, "invalid option '--rank': expected a whole number (got 'x')"),
        (["silo"], {"FEDSILO_RANK": "x"}, "invalid option '--rank': expected a whole number (got 'x')"),
        (["run", "--restarts", "-1"], {}, "invalid option '--restarts': must be at least 0 (got '-1')"),
        (
            ["simulate", "--clients", "0"],
            {},
            "invalid setting 'silos': Input should be greater than or equal to 1 (got '0')",
        ),
        (
            ["run", "--partition", "foo"],
            {},
            "invalid setting 'partition': Input should be 'iid', 'none', 'label-sorted' or 'dirichlet' (got 'foo')",
        ),
        (
            ["run"],
            {"FEDSILO_DEVICE": "tpu"},
            "invalid setting 'device': Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')",
        ),
        (["run", "--max-length", "1.5"], {}, "invalid setting 'max_length'"),
        (["run", "--server-lr", "0"], {}, "invalid setting 'server_lr': Input should be greater than 0 (got '0')"),
        (
            ["run", "--server-optimizer", "fedadam"],
            {},
            "invalid settings: server_optimizer fedadam needs server_lr (--server-lr)",
        ),
        (
            ["run"],
            {"FEDSILO_FEDPROX_MU": "-1"},
            "invalid setting 'fedprox_mu': Input should be greater than or equal to 0 (got '-1')",
        ),
        (["run", "--warmup-ratio", "1"], {}, "invalid setting 'warmup_ratio': Input should be less than 1 (got '1')"),
    ],
    ids=[
        "rank-not-a-number",
        "rank-variable",
        "restarts-negative",
        "clients-0",
        "partition-not-a-choice",
        "device-variable-not-a-choice",
        "max-length-not-whole",
        "server-lr-0",
        "adaptive-without-server-lr",
        "fedprox-mu-negative-variable",
        "warmup-ratio-1",
    ],
)
def test_a_bad_value_is_one_line(args: list[str], env: dict[str, str], expected: str, resolved, tmp_path: Path) -> None:
    line = one_error_line(fedsilo(*args, "--dataset", "a.csv", **env), exit_code=EX_CONFIG)
    assert expected in line
    assert not resolved and not list(tmp_path.iterdir())


# -- Click's usage errors: one line, exit 2 (a usage error, which the Helm chart fails fast on) ----------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--rounds"], "option '--rounds' requires an argument"),
        (["run", "--round", "3"], "no such option: --round"),
        (["runn"], "no such command 'runn'"),
        (["--verbose", "run"], "no such option: --verbose"),
        (["sweep"], "missing option '--config'"),
        (["run", "--attention-mask", "yes"], "got unexpected extra argument"),
    ],
    ids=[
        "missing-value",
        "unknown-option",
        "unknown-command",
        "unknown-top-level-option",
        "missing-option",
        "value-after-a-flag",
    ],
)
def test_a_usage_error_is_one_line(args: list[str], expected: str, resolved) -> None:
    line = one_error_line(fedsilo(*args), exit_code=2)
    assert expected in line.lower()
    assert not resolved


def test_a_bad_on_off_variable_is_one_line_naming_it(resolved) -> None:
    line = one_error_line(fedsilo("run", "--dataset", "a.csv", FEDSILO_ATTENTION_MASK="maybe"), exit_code=2)
    assert "'--attention-mask'" in line and "FEDSILO_ATTENTION_MASK" in line


# -- help --------------------------------------------------------------------------------------------
def panels_of(output: str) -> list[str]:
    return [line.split("─ ", 1)[1].split(" ─", 1)[0] for line in output.splitlines() if line.startswith("╭─ ")]


def test_aggregator_help_lists_every_variable_by_section_after_its_own_options() -> None:
    result = fedsilo("aggregator", "--help", COLUMNS="250")
    assert result.exit_code == 0, result.output
    for variable in ["FEDSILO_CONFIG", *(f"FEDSILO_{key.upper()}" for key in FIELDS)]:
        assert f"[env var: {variable}]" in result.output, variable
    assert panels_of(result.output) == ["Options", "Settings", *(name.capitalize() for name in SECTIONS)]


def test_silo_help_leaves_out_the_aggregators_settings_but_takes_them(resolved) -> None:
    result = fedsilo("silo", "--help", COLUMNS="250")
    assert result.exit_code == 0, result.output
    assert panels_of(result.output) == ["Options", "Settings", "Model", "Data", "Train", "Federation"]
    assert "[env var: FEDSILO_RANK]" in result.output and "FEDSILO_TRACKING_URI" not in result.output
    # ... yet one config file serves every rank: a silo accepts them (and fails later, on its rank)
    taken = fedsilo("silo", "--tracking-uri", "sqlite:///x.db", "--checkpoint-dir", "c", "--lr", "0.1", "--rank", "9")
    assert "no such option" not in taken.output, taken.output


def test_silo_help_fits_a_screen_of_what_its_operator_sets_and_help_all_shows_the_rest() -> None:
    short = fedsilo("silo", "--help", COLUMNS="80")
    assert short.exit_code == 0, short.output
    assert len(short.output.splitlines()) <= 110  # from 487 lines when every setting was listed
    for variable in ("FEDSILO_AGGREGATOR", "FEDSILO_DATASET", "FEDSILO_TLS_CERT", "FEDSILO_TOKEN_FILE"):
        assert variable in short.output, variable
    assert "FEDSILO_LR]" not in short.output and "--help-all" in short.output
    everything = fedsilo("silo", "--help-all", COLUMNS="250")
    assert everything.exit_code == 0, everything.output
    for variable in ("FEDSILO_LR", "FEDSILO_TRACKING_URI", "FEDSILO_DP_EPSILON", "FEDSILO_SERVER_OPTIMIZER"):
        assert f"[env var: {variable}]" in everything.output, variable


def test_version() -> None:
    result = fedsilo("--version")
    assert (result.exit_code, result.output) == (0, f"fedsilo {__version__}\n")
