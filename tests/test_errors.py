"""Exit codes that tell a supervisor whether a restart can help (fedsilo.errors).

78 (EX_CONFIG): a bad setting, bad data, a model that cannot load, a refused join: the Helm
chart's podFailurePolicy fails the Job at once. 1: a lost peer or a timeout, which a restart of
the federation resumes. The end-to-end cases (real processes) are in test_bad_inputs.py and
test_resilience.py; these check each class, the CLI's mapping and the join verdict's wire.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fedsilo import join, launcher
from fedsilo.cli import app
from fedsilo.config import build_settings
from fedsilo.errors import (
    EX_CONFIG,
    EX_RETRY,
    PERMANENT_EXIT_CODES,
    CertificateRefused,
    ConfigError,
    DataError,
    FederationError,
    FedsiloError,
    JoinRefused,
    ModelError,
)
from fedsilo.options import user_errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("invalid setting 'rounds'"), EX_CONFIG),
        (DataError("data file not found: /data/notes.csv"), EX_CONFIG),
        (ModelError("cannot load model 'x'"), EX_CONFIG),
        (JoinRefused("the aggregator refused silo 1: wrong or missing join token"), EX_CONFIG),
        (CertificateRefused("certificate serial 0x1 is revoked"), EX_CONFIG),
        (FederationError("lost silo 2 during round 3: local training"), EX_RETRY),
        (FederationError("silo(s) 2 did not join within 600s"), EX_RETRY),
        # an instance whose kind says otherwise
        (JoinRefused("rank 1 is already taken by another silo", retryable=True), EX_RETRY),
        (FederationError("backend 'nccl' needs a GPU", retryable=False), EX_CONFIG),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_each_error_exits_with_the_code_of_its_kind(error: FedsiloError, code: int) -> None:
    # Execute: the CLI's one place where user errors become one line and an exit code
    with pytest.raises(typer.Exit) as exited, user_errors():
        raise error
    # Assert
    assert exited.value.exit_code == code
    assert error.retryable is (code not in PERMANENT_EXIT_CODES)


def test_the_code_survives_pickling() -> None:
    # sweeps and simulations may hand errors across processes
    again = pickle.loads(pickle.dumps(JoinRefused("rank taken", retryable=True)))
    assert again.exit_code == EX_RETRY and str(again) == "rank taken"


def test_a_bad_setting_and_a_missing_data_file_exit_78(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad_setting = CliRunner().invoke(app, ["silo", "--rank", "1", "--rounds", "0", "--dataset", "x.csv"])
    assert bad_setting.exit_code == EX_CONFIG, bad_setting.output
    assert bad_setting.stderr.startswith("fedsilo: error: invalid setting 'rounds'")
    # a usage error stays Click's 2, which the chart fails fast on too
    usage = CliRunner().invoke(app, ["silo", "--no-such-flag"])
    assert usage.exit_code == 2 and usage.exit_code in PERMANENT_EXIT_CODES


class VerdictStore:
    """A rendezvous store holding one aggregator's answer: when the silo waits for its verdict,
    the aggregator's side (join.refuse) writes it, as it would after reading the hello."""

    def __init__(self, reason: str, retryable: bool, claimed: bool = False) -> None:
        self.data: dict[str, bytes] = {"fedsilo/nonce": b"server-nonce"}
        self.reason, self.retryable, self.claimed = reason, retryable, claimed

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        if key.startswith("fedsilo/verdict/") and key not in self.data:
            hello = join.Hello(**json.loads(self.data[f"fedsilo/hello/{key.split('/')[2]}"]))
            join.refuse(self, hello, self.reason, retryable=self.retryable)
        return self.data[key]

    def add(self, key: str, amount: int) -> int:
        return 2 if self.claimed else 1

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def delete_key(self, key: str) -> bool:
        return self.data.pop(key, None) is not None


HELLO: dict[str, Any] = {
    "settings": {},
    "labels": None,
    "architecture": "a",
    "train_examples": 1,
    "eval_examples": 0,
}


@pytest.mark.parametrize(
    ("reason", "retryable", "code"),
    [
        ("wrong or missing join token", False, EX_CONFIG),
        ("its settings differ: silos=3 (aggregator: 2)", False, EX_CONFIG),
        ("silo(s) 2 did not join within 600s", True, EX_RETRY),
    ],
)
def test_a_refusal_tells_the_silo_whether_to_try_again(reason: str, retryable: bool, code: int) -> None:
    store = VerdictStore(reason, retryable)
    with pytest.raises(JoinRefused, match=reason.replace("(", r"\(").replace(")", r"\)")) as refused:
        join.request_admission(store, 1, "token", HELLO)
    assert refused.value.exit_code == code


def test_a_verdict_from_an_older_aggregator_is_permanent() -> None:
    # no "retryable" key on the wire: a refusal, as before
    store = VerdictStore("wrong or missing join token", False)
    store.get = lambda key: (  # type: ignore[method-assign]
        json.dumps({"ok": False, "reason": "no"}).encode() if key.startswith("fedsilo/verdict/") else b"n"
    )
    with pytest.raises(JoinRefused) as refused:
        join.request_admission(store, 1, "token", HELLO)
    assert refused.value.exit_code == EX_CONFIG


def test_a_rank_still_taken_is_retryable() -> None:
    # after a restart the previous aggregator may still hold the old claim
    with pytest.raises(JoinRefused, match="already taken") as refused:
        join.request_admission(VerdictStore("", False, claimed=True), 1, "token", HELLO)
    assert refused.value.exit_code == EX_RETRY


@pytest.mark.parametrize(("retryable", "attempts"), [(False, 1), (True, 3)], ids=["permanent", "retryable"])
def test_fedsilo_run_restarts_only_what_a_restart_can_fix(
    retryable: bool, attempts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def launch_once(*args: Any) -> None:
        calls.append(args)
        raise FederationError("silo 1 failed (exit code N); stopped the others", retryable=retryable)

    monkeypatch.setattr(launcher, "launch_once", launch_once)
    settings = build_settings({"dataset": "x.csv", "silos": 1})
    with pytest.raises(FederationError) as failed:
        launcher.run_local(settings, restarts=2)
    assert len(calls) == attempts
    assert failed.value.exit_code == (EX_RETRY if retryable else EX_CONFIG)
