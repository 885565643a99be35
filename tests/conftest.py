from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.procs import Watched, kill_tree
from tests.tiny import make_tiny_model, sentiment_rows, write_csv

# The cores are shared among the test processes (pytest-xdist's workers, -n in pyproject's
# addopts): each computes on its share, as fedsilo's launcher shares them among silos, instead
# of every worker's thread pool spinning on every core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# The modules that take longest, longest first: pytest-xdist (--dist loadfile) then hands out the
# short ones last, and the two test processes finish close together.
LONGEST_FIRST = [
    "test_bad_inputs",
    "test_federation",
    "test_pretrained",
    "test_chart_federates",
    "test_simulate",
    "test_mlflow",
    "test_peft",
    "test_tls",
    "test_resilience",
    "test_sweep",
    "test_chart",
    "test_ledger",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order


@pytest.fixture
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests that time how a failure is detected, and the one that loads the machine on purpose, never
    run beside each other in pytest-xdist's test processes (-n, pyproject's addopts): they hold one
    lock, a file beside the processes' temporary directories."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    with (tmp_path_factory.getbasetemp().parent / "one-at-a-time.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
