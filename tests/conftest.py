from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Watched, kill_tree
from tests.tiny import make_tiny_model, sentiment_rows, write_csv


@pytest.fixture(autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access: a hub name must fail at once, not hang."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for key in [k for k in os.environ if k.startswith("FEDSILO_") or k in ("MASTER_ADDR", "MASTER_PORT")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows(240))


@pytest.fixture
def reaper() -> Iterator[list[Watched]]:
    """Processes a test started; any still running at the end (a failed test) are killed with their children."""
    started: list[Watched] = []
    yield started
    for p in started:
        kill_tree(p.process)
