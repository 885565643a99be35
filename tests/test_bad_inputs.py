"""Bad inputs through the real CLI: each is refused with one clear line and leaves nothing behind.

Every case runs ``python -m fedsilo ...`` as a subprocess, the way users start it, and asserts:
its exit code (78, EX_CONFIG, for what no restart can fix: a bad setting, bad data, a refused
join; 1 for a broken federation that a restart may form again: a lost or absent peer, a port in
use), exactly one ``fedsilo: error: ...`` line naming the problem, no Python traceback,
no checkpoint file under ``--checkpoint-dir`` and no MLflow run left RUNNING or FINISHED in the
``mlflow.db`` of the working directory.

Most cases fail within the few seconds of one process start. The federation cases (several
processes) use fedsilo's default join and round timeouts, which only a failing test ever waits
out. Variants of a default-run case and the costlier extras are marked ``slow``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedsilo.cli import app
from fedsilo.config import load_settings, settings_fingerprint
from fedsilo.errors import EX_CONFIG, EX_RETRY
from fedsilo.launcher import free_port
from tests.procs import HANG_GUARD, Watched, run, run_timed, watch
from tests.tiny import make_tiny_model, sentiment_rows, write_csv

ERROR = "fedsilo: error: "
# A failing process must not wait long for a federation it will never see.
QUICK = ["--join-timeout", "2", "--round-timeout", "5", "--checkpoint-dir", "ckpt"]
# Ranks that must find each other: fedsilo's default join and round timeouts (600 s, 7200 s),
# which a loaded machine cannot break and only a failing test ever waits on.
MEET = ["--checkpoint-dir", "ckpt", "--rounds", "1", "--local-epochs", "1", "--batch-size", "16", "--lr", "0.1"]
MISSING_RANK_TIMEOUT = 10
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")


# -- assertions -------------------------------------------------------------------------------------
def error_line(output: str, *expected: str) -> str:
    """The one ``fedsilo: error:`` line of ``output``; it must contain every ``expected`` part."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1, output
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}\n{output}"
    return lines[0]


def nothing_written(workdir: Path, allowed: frozenset[Path] = frozenset()) -> None:
    """No checkpoint file, and no MLflow run that looks alive or successful."""
    checkpoints = workdir / "ckpt"
    if checkpoints.exists():
        files = {p for p in checkpoints.rglob("*") if p.is_file()} - allowed
        assert not files, f"a failed start wrote {sorted(map(str, files))}"
    assert not mlflow_statuses(workdir) & {"RUNNING", "FINISHED"}


def mlflow_statuses(workdir: Path) -> set[str]:
    db = workdir / "mlflow.db"
    if not db.exists():
        return set()
    with sqlite3.connect(db) as connection:
        try:
            return {status for (status,) in connection.execute("SELECT status FROM runs")}
        except sqlite3.OperationalError:  # the schema was never created
            return set()


def refused(result: subprocess.CompletedProcess[str], workdir: Path, *expected: str, code: int = EX_CONFIG) -> str:
    """A single process failed cleanly: exit ``code`` (EX_CONFIG unless a retry could help), one
    error line on stderr, nothing written."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    line = error_line(result.stderr, *expected)
    nothing_written(workdir)
    return line


def no_native_stack(output: str) -> None:
    """torch's C++ layers print their own stack traces; users must not see them either."""
    assert "Exception raised from" not in output and "\nframe #" not in output, output


# -- processes ----------------------------------------------------------------------------------------
def first_to_exit(processes: list[Watched], timeout: float = HANG_GUARD) -> Watched:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in processes:
            if p.process.poll() is not None:
                return p
        time.sleep(0.1)
    raise AssertionError("no process exited:\n" + "\n---\n".join(p.output for p in processes))


# -- inputs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """tiny_bert's encoder saved without its 2-label head, like a hub checkpoint: any label count
    gets a fresh head."""
    from transformers import AutoModel, AutoTokenizer

    target = tmp_path_factory.mktemp("tiny_encoder")
    AutoModel.from_pretrained(tiny_bert).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(target)
    return target


def csv_text(rows: list[dict[str, str]]) -> str:
    return "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)


GOOD = csv_text(sentiment_rows(40))


def three_labels(n: int = 60, seed: int = 5) -> list[dict[str, str]]:
    """Sentiment rows where every sixth row is labelled 'meh': a label the others lack."""
    rows = sentiment_rows(n, seed=seed)
    for row in rows[::6]:
        row["label"] = "meh"
    return rows


def _binary(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(random.Random(0).randrange(256) for _ in range(4096)))
    return path


def _write(name: str, content: str | bytes, encoding: str = "utf-8") -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding=encoding)
        return path

    return make


def _empty_dir(directory: Path) -> Path:
    (directory / "shards").mkdir()
    (directory / "shards" / "README").write_text("data goes here\n")
    return directory / "shards"


LATIN1 = "text,label\n" + "".join(f"un café très {w},{lab}\n" for w, lab in [("bon", "pos"), ("fade", "neg")] * 10)

# (data file maker, extra options, parts of the expected message)
DATA_CASES = {
    "empty-file": (_write("data.csv", b""), [], ["data.csv", "cannot be read as csv"]),
    "header-only": (_write("data.csv", "text,label\n"), [], ["data.csv", "holds no rows"]),
    "binary": (lambda d: _binary(d / "data.csv"), [], ["data.csv", "not UTF-8"]),
    "utf-16": (_write("data.csv", GOOD, "utf-16"), [], ["data.csv", "not UTF-8"]),
    "latin-1": (_write("data.csv", LATIN1, "latin-1"), [], ["data.csv", "not UTF-8"]),
    "unclosed-quote": (
        _write("data.csv", 'text,label\n"an unclosed quote,pos\n' + GOOD[11:]),
        [],
        ["data.csv", "cannot be read as csv"],
    ),
    "corrupt-parquet": (
        _write("data.parquet", b"PAR1 not really parquet"),
        [],
        ["data.parquet", "cannot be read as parquet"],
    ),
    "corrupt-jsonl": (
        _write("data.jsonl", '{"text": "fine", "label": "pos"}\n{"text": "broken\n'),
        [],
        ["data.jsonl", "cannot be read as json"],
    ),
    "no-text-column": (
        _write("data.csv", GOOD.replace("text,label", "body,label", 1)),
        [],
        ["data.csv", "no column 'text'", "columns: body, label"],
    ),
    "no-label-column": (
        _write("data.csv", GOOD.replace("text,label", "text,sentiment", 1)),
        [],
        ["data.csv", "no column 'label'", "columns: text, sentiment"],
    ),
    "empty-label": (
        _write("data.csv", "text,label\ngood film,pos\nbad film,neg\ndull film,\n" + GOOD[11:]),
        [],
        ["data.csv", "row 3 has an empty label in column 'label'"],
    ),
    "nan-label": (
        _write("data.csv", "text,label\ngood film,pos\nbad film,NaN\n" + GOOD[11:]),
        [],
        ["data.csv", "row 2 has an empty label in column 'label'"],
    ),
    "empty-text": (
        _write("data.csv", "text,label\ngood film,pos\n,neg\n" + GOOD[11:]),
        [],
        ["data.csv", "row 2 has no text in column 'text'"],
    ),
    "txt-extension": (_write("data.txt", GOOD), [], ["data.txt", "unsupported file type"]),
    "missing-file": (lambda d: d / "missing.csv", [], ["data file not found", "missing.csv"]),
    "hub-dataset-offline": (
        lambda d: Path("nobody-here/no-such-dataset"),
        [],
        ["dataset 'nobody-here/no-such-dataset'", "hub"],
    ),
    "directory-without-data": (_empty_dir, [], ["shards", "no .csv"]),
    "one-row": (_write("data.csv", "text,label\ngood film,pos\n"), [], ["data.csv", "too few rows (1)"]),
    "fewer-rows-than-silos": (
        _write("data.csv", csv_text(sentiment_rows(4))),
        ["--silos", "5"],
        ["cannot split 3 training examples into 5 silos"],
    ),
    "label-outside-labels": (
        lambda d: write_csv(d / "data.csv", three_labels()),
        ["--labels", "neg,pos"],
        ["label 'meh' is not in the federation's label set [neg, pos]"],
    ),
}


# Variants of a default-run case and rarer inputs: only with -m slow (each case costs a process start).
SLOW_DATA = {"utf-16", "corrupt-parquet", "empty-label", "directory-without-data", "one-row", "fewer-rows-than-silos"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_DATA else c for c in DATA_CASES])
def test_bad_data_file(case: str, tmp_path: Path, encoder: Path) -> None:
    make, extra, expected = DATA_CASES[case]
    data = make(tmp_path)
    # A silo reads its data before it looks for the aggregator; the closed port and the short
    # join timeout turn an accepted file into a quick, different failure instead of a hang.
    result = run(
        "silo",
        "--rank",
        "1",
        "--silos",
        "1",
        "--model",
        str(encoder),
        "--dataset",
        str(data),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *QUICK,
        *extra,
        cwd=tmp_path,
    )
    refused(result, tmp_path, *expected)


def test_bad_data_stops_the_aggregator_before_it_listens(tmp_path: Path, tiny_bert: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text(GOOD.replace("text,label", "review,label", 1))
    result = run(
        "aggregator",
        "--silos",
        "2",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(data),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *QUICK,
        cwd=tmp_path,
    )
    refused(result, tmp_path, "data.csv", "no column 'text'", "columns: review, label")
    assert "waiting for" not in result.stdout


@pytest.mark.slow  # three processes
def test_bad_data_through_fedsilo_run_names_role_and_problem(tmp_path: Path, tiny_bert: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text(GOOD)
    result = run(
        "run", "--silos", "1", "--model", str(tiny_bert), "--dataset", str(data), *QUICK, cwd=tmp_path, timeout=120
    )
    # a child's configuration error is the launcher's too: 78, and no restart
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    # the children's own one-line errors, prefixed by role, then the launcher's verdict
    assert f"] {ERROR}{data}: unsupported file type" in result.stdout
    assert "Traceback" not in result.stdout
    refused(result, tmp_path, f"failed (exit code {EX_CONFIG}); stopped the others")


# -- settings ---------------------------------------------------------------------------------------------
def _config(text: str) -> Callable[[Path], list[str]]:
    def make(directory: Path) -> list[str]:
        (directory / "fedsilo.yaml").write_text(text)
        return ["--config", "fedsilo.yaml"]

    return make


def _flags(*flags: str) -> Callable[[Path], list[str]]:
    return lambda directory: list(flags)


def _empty_token_file(directory: Path) -> list[str]:
    (directory / "token").write_text("\n")
    return ["--token-file", "token"]


# (options maker, extra environment, parts of the expected message). Flag and FEDSILO_* values
# reach validation as the text typed, so the message quotes them: (got '0').
SETTINGS_CASES = {
    "bad-yaml": (_config("rounds: 2\nlr: [0.1\n"), {}, ["fedsilo.yaml", "not valid YAML at line"]),
    "yaml-not-a-mapping": (_config("- rounds\n- 2\n"), {}, ["fedsilo.yaml", "must hold a mapping"]),
    "unknown-yaml-key": (_config("rounds: 2\nlearning_rate: 0.1\n"), {}, ["unknown setting(s): learning_rate"]),
    "missing-config-file": (_flags("--config", "nope.yaml"), {}, ["config file not found: nope.yaml"]),
    "rounds-0": (_flags("--rounds", "0"), {}, ["invalid setting 'rounds'", "(got '0')"]),
    "lr-negative-env": (_flags(), {"FEDSILO_LR": "-1"}, ["invalid setting 'lr'", "greater than 0"]),
    "batch-size-0-yaml": (_config("batch_size: 0\n"), {}, ["invalid setting 'batch_size'", "(got 0)"]),
    "eval-fraction-1.5": (_flags("--eval-fraction", "1.5"), {}, ["invalid setting 'eval_fraction'", "(got '1.5')"]),
    "silos-0": (_flags("--silos", "0"), {}, ["invalid setting 'silos'", "(got '0')"]),
    "partition-unknown": (_flags("--partition", "random"), {}, ["invalid setting 'partition'", "'random'"]),
    "aggregator-not-host-port": (
        _flags("--aggregator", "127.0.0.1:99999"),
        {},
        ["invalid setting 'aggregator'", "HOST:PORT"],
    ),
    "rank-0": (_flags("--rank", "0", "--silos", "2"), {}, ["rank 0 is outside 1..2"]),
    "rank-k-plus-1": (_flags("--rank", "3", "--silos", "2"), {}, ["rank 3 is outside 1..2"]),
    "job-index-not-a-number": (
        _flags(),
        {"JOB_COMPLETION_INDEX": "three"},
        ["JOB_COMPLETION_INDEX must be a number", "'three'"],
    ),
    "token-file-missing": (_flags("--token-file", "no-such-token"), {}, ["cannot read token file no-such-token"]),
    "token-file-empty": (_empty_token_file, {}, ["token file token is empty"]),
    "master-port-not-a-number": (_flags(), {"MASTER_PORT": "http"}, ["MASTER_PORT must be a port number", "'http'"]),
    "model-directory-missing": (
        _flags("--model", "/no/such/model-dir"),
        {},
        ["'/no/such/model-dir'", "not a local directory"],
    ),
    "hub-model-offline": (
        _flags("--model", "nobody-here/no-such-model"),
        {},
        ["'nobody-here/no-such-model'", "cannot load"],
    ),
}
NEEDS_RANK = {"rank-0", "rank-k-plus-1", "job-index-not-a-number"}
NEEDS_PORT = {"aggregator-not-host-port", "master-port-not-a-number"}


# Likewise.
SLOW_SETTINGS = {
    "yaml-not-a-mapping",
    "missing-config-file",
    "partition-unknown",
    "aggregator-not-host-port",
    "job-index-not-a-number",
    "token-file-empty",
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_SETTINGS else c for c in SETTINGS_CASES]
)
def test_bad_setting(case: str, tmp_path: Path, tiny_bert: Path, sentiment_csv: Path) -> None:
    make, env, expected = SETTINGS_CASES[case]
    options = make(tmp_path)
    rank = [] if case in NEEDS_RANK else ["--rank", "1"]
    port = [] if case in NEEDS_PORT else ["--aggregator", f"127.0.0.1:{free_port()}"]
    silos = [] if "--silos" in options else ["--silos", "1"]
    result = run(
        "silo",
        *rank,
        *silos,
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        *port,
        *QUICK,
        *options,
        cwd=tmp_path,
        **env,
    )
    refused(result, tmp_path, *expected)


def test_flag_of_the_wrong_type(tmp_path: Path, tiny_bert: Path, sentiment_csv: Path) -> None:
    result = run(
        "silo",
        "--rank",
        "1",
        "--silos",
        "1",
        "--rounds",
        "many",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        *QUICK,
        cwd=tmp_path,
    )
    refused(result, tmp_path, "'rounds'", "many")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--restarts", "-1"], "invalid option '--restarts': must be at least 0 (got '-1')"),
        (["run", "--restarts", "twice"], "invalid option '--restarts': expected a whole number (got 'twice')"),
        (["silo", "--rank", "one"], "invalid option '--rank': expected a whole number (got 'one')"),
        (
            ["simulate", "--clients", "many"],
            "invalid setting 'silos': Input should be a valid integer, unable to parse string as an integer (got 'many')",
        ),
    ],
    ids=["restarts-negative", "restarts-not-a-number", "rank-not-a-number", "clients-not-a-number"],
)
def test_a_commands_own_option_of_the_wrong_type(
    args: list[str], expected: str, tmp_path: Path, monkeypatch, tiny_bert: Path, sentiment_csv: Path
) -> None:
    # Options of one command (not settings) are read the same way: one line, before any work.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, [*args, "--silos", "2", "--model", str(tiny_bert), "--dataset", str(sentiment_csv)]
    )
    assert result.exit_code == EX_CONFIG, result.output
    assert result.stderr.strip().splitlines() == [f"fedsilo: error: {expected}"]
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


@NO_GPU
@pytest.mark.parametrize(
    "option, expected",
    [
        (["--backend", "nccl"], "backend 'nccl' needs a GPU"),
        (["--device", "cuda"], "device 'cuda' was asked for, but no GPU is visible"),
    ],
    ids=["nccl-on-cpu", "cuda-without-gpu"],
)
def test_gpu_settings_on_a_cpu_machine(
    option: list[str], expected: str, tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    result = run(
        "aggregator",
        "--silos",
        "1",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *QUICK,
        *option,
        cwd=tmp_path,
    )
    refused(result, tmp_path, expected)


def test_checkpoint_directory_under_a_regular_file(tmp_path: Path, tiny_bert: Path, sentiment_csv: Path) -> None:
    # Tests run as root, so a chmod would not stop the write; a file where a directory must go does.
    (tmp_path / "ckpt").write_text("not a directory\n")
    result = run(
        "aggregator",
        "--silos",
        "1",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *QUICK,
        "--checkpoint-dir",
        "ckpt/run1",
        cwd=tmp_path,
    )
    assert result.returncode == EX_CONFIG
    error_line(result.stderr, "checkpoint directory ckpt/run1 is not writable", "Not a directory")
    assert (tmp_path / "ckpt").read_text() == "not a directory\n"
    assert not mlflow_statuses(tmp_path)


def test_port_in_use(tmp_path: Path, tiny_bert: Path, sentiment_csv: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run(
            "aggregator",
            "--silos",
            "1",
            "--model",
            str(tiny_bert),
            "--dataset",
            str(sentiment_csv),
            "--aggregator",
            f"127.0.0.1:{port}",
            *QUICK,
            cwd=tmp_path,
        )
    # retryable: in Kubernetes the previous aggregator may still be going away
    refused(result, tmp_path, f"cannot listen on port {port}", "in use", code=EX_RETRY)


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path):
    """A silo that gets as far as looking for its aggregator, where nobody listens. Its data has
    three labels: tiny_bert's 2-label head must be replaced to get there (a test of its own)."""
    workdir = tmp_path_factory.mktemp("unreachable")
    data = write_csv(workdir / "data.csv", three_labels())
    port = free_port()  # bound and closed again: nobody listens there
    result, arrivals = run_timed(
        "silo",
        "--rank",
        "1",
        "--silos",
        "1",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(data),
        "--aggregator",
        f"127.0.0.1:{port}",
        *QUICK,
        cwd=workdir,
    )
    # From the line that says it starts looking to its error line: the join timeout, not start-up
    joining = next((at for at, line in arrivals if "training examples; joining" in line), None)
    said = next((at for at, line in arrivals if line.startswith(ERROR)), None)
    seconds = None if joining is None or said is None else said - joining
    return workdir, port, result, seconds


def test_unreachable_aggregator(unreachable) -> None:
    workdir, port, result, seconds = unreachable
    refused(result, workdir, f"cannot reach the aggregator at 127.0.0.1:{port} within 2s", code=EX_RETRY)
    assert seconds is not None and seconds < 60


def test_unreachable_aggregator_prints_no_native_stack(unreachable) -> None:
    _, _, result, _ = unreachable
    no_native_stack(result.stderr)


# -- labels and models --------------------------------------------------------------------------------------
def test_a_single_label_is_refused(tmp_path: Path, encoder: Path) -> None:
    data = write_csv(tmp_path / "data.csv", [r for r in sentiment_rows(60) if r["label"] == "pos"])
    result = run(
        "silo",
        "--rank",
        "1",
        "--silos",
        "1",
        "--model",
        str(encoder),
        "--dataset",
        str(data),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *QUICK,
        cwd=tmp_path,
    )
    refused(result, tmp_path, "label")
    assert "cannot reach the aggregator" not in result.stderr


def test_duplicate_labels_are_refused(tmp_path: Path, encoder: Path, sentiment_csv: Path) -> None:
    result = run(
        "silo",
        "--rank",
        "1",
        "--silos",
        "1",
        "--model",
        str(encoder),
        "--dataset",
        str(sentiment_csv),
        "--labels",
        "neg,neg,pos",
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *QUICK,
        cwd=tmp_path,
    )
    refused(result, tmp_path, "neg")
    assert "cannot reach the aggregator" not in result.stderr


def test_a_local_classifier_with_another_label_count_gets_a_fresh_head(unreachable) -> None:
    # tiny_bert has a 2-label head; three labels need a new one, and the encoder is kept. The
    # silo then gets as far as looking for the (absent) aggregator.
    workdir, _, result, _ = unreachable
    refused(result, workdir, "cannot reach the aggregator", code=EX_RETRY)
    assert "training examples; joining" in result.stdout


def test_a_local_model_that_cannot_load_is_not_called_missing(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for item in tiny_bert.iterdir():
        (model / item.name).symlink_to(item)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").write_bytes(b"not safetensors")
    result = run(
        "silo",
        "--rank",
        "1",
        "--silos",
        "1",
        "--model",
        str(model),
        "--dataset",
        str(sentiment_csv),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *QUICK,
        cwd=tmp_path,
    )
    line = refused(result, tmp_path, f"cannot load model '{model}' from local directory")
    assert "hub" not in line


# -- federations that must not form ---------------------------------------------------------------------------
@pytest.mark.slow  # 60 s: a refused duplicate, then the federation forming; the default run keeps the other refusals
def test_duplicate_rank_is_refused_and_the_federation_still_forms(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, reaper
) -> None:
    shared = [
        "--silos",
        "2",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *MEET,
    ]
    reaper.append(aggregator := watch("aggregator", *shared, cwd=tmp_path))
    twins = [watch("silo", "--rank", "1", *shared, cwd=tmp_path) for _ in range(2)]
    reaper.extend(twins)
    loser = first_to_exit(twins)
    code, output = loser.result()
    assert code == EX_RETRY, "a rank still taken can be free after a restart"
    error_line(output, "rank 1 is already taken by another silo")
    # the claim of the refused twin does not block rank 2, and the federation completes
    reaper.append(rank2 := watch("silo", "--rank", "2", *shared, cwd=tmp_path))
    winner = twins[1] if loser is twins[0] else twins[0]
    for p in (winner, rank2, aggregator):
        code, output = p.result()
        assert code == 0 and "Traceback" not in output, output
    assert mlflow_statuses(tmp_path) == {"FINISHED"}


@pytest.fixture(scope="module")
def missing_rank(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_csv: Path):
    """An aggregator of 2 silos that only silo 1 joins."""
    workdir = tmp_path_factory.mktemp("missing_rank")
    shared = [
        "--silos",
        "2",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        "--checkpoint-dir",
        "ckpt",
        "--round-timeout",
        "10",
    ]
    silo = watch("silo", "--rank", "1", *shared, cwd=workdir)  # fedsilo's default join timeout
    try:
        # The aggregator's join timeout must measure the missing silo 2, not silo 1's start-up or
        # its knocking: the store client backs off between attempts, by longer and longer waits
        # while the port stays closed (as it does for the aggregator's start-up, which a loaded
        # machine stretches to a minute). So silo 1 is held (SIGSTOP) from the moment it starts
        # knocking until the port is open, and then knocks again at once.
        silo.wait_for("joining")
        os.kill(silo.process.pid, signal.SIGSTOP)
        try:
            aggregator = watch("aggregator", *shared, "--join-timeout", str(MISSING_RANK_TIMEOUT), cwd=workdir)
            aggregator.wait_for("waiting for 2 silo(s)")
        finally:
            os.kill(silo.process.pid, signal.SIGCONT)
        agg_code, agg_output = aggregator.result()
        silo_code, silo_output = silo.result()
    finally:
        if silo.process.poll() is None:
            silo.process.kill()
    return workdir, (agg_code, agg_output), (silo_code, silo_output)


def test_missing_rank_is_named_by_the_aggregator(missing_rank) -> None:
    workdir, (code, output), _ = missing_rank
    assert code == EX_RETRY
    assert "silo 1 joined" in output
    error_line(output, f"silo(s) 2 did not join within {MISSING_RANK_TIMEOUT}s")
    nothing_written(workdir)


def test_missing_rank_the_waiting_silo_gets_one_line(missing_rank) -> None:
    _, _, (code, output) = missing_rank
    assert code == EX_RETRY, "told the join timed out: a restart may bring the missing silo"
    error_line(output, "aggregator")


@pytest.mark.slow  # 30 s: three processes; the other mismatched-settings refusals stay in the default run
def test_wrong_world_size_is_refused_naming_the_key(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, reaper
) -> None:
    shared = [
        "--model",
        str(tiny_bert),
        "--dataset",
        str(sentiment_csv),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *MEET,
    ]
    reaper.extend(
        procs := [
            watch("aggregator", "--silos", "2", *shared, cwd=tmp_path),
            watch("silo", "--rank", "1", "--silos", "2", *shared, cwd=tmp_path),
            watch("silo", "--rank", "2", "--silos", "3", *shared, cwd=tmp_path),
        ]
    )
    (agg_code, agg_out), (s1_code, s1_out), (s2_code, s2_out) = [p.result() for p in procs]
    assert (agg_code, s1_code, s2_code) == (EX_CONFIG, EX_CONFIG, EX_CONFIG)
    error_line(agg_out, "refused silo 2", "its settings differ: silos=3 (aggregator: 2)")
    error_line(s2_out, "the aggregator refused silo 2", "silos=3 (aggregator: 2)")
    error_line(s1_out, "the aggregator refused silo 1", "the federation could not form", "silos=3")
    nothing_written(tmp_path)


def test_wrong_and_missing_tokens_are_refused_and_the_real_silos_join(tmp_path: Path, tiny_bert: Path, reaper) -> None:
    # Extra columns are fine: this federation's data has two (the positive control).
    data = tmp_path / "data.csv"
    data.write_text(
        "id,text,source,label\n"
        + "".join(f"{i},{r['text']},web,{r['label']}\n" for i, r in enumerate(sentiment_rows(60)))
    )
    secret, guess = "alpha-7f3c-secret", "bravo-91d2-guess"
    shared = [
        "--silos",
        "2",
        "--model",
        str(tiny_bert),
        "--dataset",
        str(data),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *MEET,
    ]
    reaper.append(aggregator := watch("aggregator", *shared, cwd=tmp_path, FEDSILO_TOKEN=secret))
    reaper.extend(
        strangers := [
            watch("silo", "--rank", "1", *shared, cwd=tmp_path, FEDSILO_TOKEN=guess),
            watch("silo", "--rank", "2", *shared, cwd=tmp_path),
        ]
    )
    for rank, stranger in enumerate(strangers, start=1):
        code, output = stranger.result()
        assert code == EX_CONFIG
        error_line(output, f"the aggregator refused silo {rank}", "wrong or missing join token")
    assert aggregator.process.poll() is None  # still waiting for the real silos
    real = [watch("silo", "--rank", str(r), *shared, cwd=tmp_path, FEDSILO_TOKEN=secret) for r in (1, 2)]
    reaper.extend(real)
    outputs = [p.result() for p in (*real, aggregator)]
    assert [code for code, _ in outputs] == [0, 0, 0], outputs
    agg_output = outputs[-1][1]
    assert "refused a process claiming silo 1: wrong or missing join token" in agg_output
    assert "refused a process claiming silo 2: wrong or missing join token" in agg_output
    everything = agg_output + "".join(out for _, out in outputs) + "".join(p.output for p in strangers)
    assert secret not in everything and guess not in everything
    assert mlflow_statuses(tmp_path) == {"FINISHED"}


def test_a_silo_with_another_architecture_is_refused(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, reaper
) -> None:
    # Same settings, same --model path, different model behind it: only the fingerprint can tell.
    here, there = tmp_path / "aggregator", tmp_path / "silo"
    here.mkdir()
    there.mkdir()
    (here / "model").symlink_to(tiny_bert)
    make_tiny_model(there / "model", "distilbert")
    shared = [
        "--silos",
        "1",
        "--model",
        "model",
        "--dataset",
        str(sentiment_csv),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *MEET,
    ]
    reaper.extend(procs := [watch("aggregator", *shared, cwd=here), watch("silo", "--rank", "1", *shared, cwd=there)])
    (agg_code, agg_out), (silo_code, silo_out) = [p.result() for p in procs]
    assert (agg_code, silo_code) == (EX_CONFIG, EX_CONFIG)
    error_line(agg_out, "silo(s) [1] built a different model from the aggregator's (model)")
    error_line(silo_out, "the aggregator refused silo 1", "different model")
    nothing_written(here)


def test_silos_that_disagree_on_the_label_set_are_refused_on_both_sides(tmp_path: Path, encoder: Path, reaper) -> None:
    # Private data (partition none): silo 2's file has a label silo 1 never saw.
    files = {
        1: write_csv(tmp_path / "h1.csv", sentiment_rows(60, seed=1)),
        2: write_csv(tmp_path / "h2.csv", three_labels()),
    }
    shared = [
        "--silos",
        "2",
        "--partition",
        "none",
        "--model",
        str(encoder),
        "--aggregator",
        f"127.0.0.1:{free_port()}",
        *MEET,
    ]
    reaper.extend(
        procs := [
            watch("aggregator", *shared, cwd=tmp_path),
            *[watch("silo", "--rank", str(r), "--dataset", str(files[r]), *shared, cwd=tmp_path) for r in (1, 2)],
        ]
    )
    (agg_code, agg_out), *silos = [p.result() for p in procs]
    assert agg_code == EX_CONFIG
    error_line(
        agg_out,
        "silos disagree on the label set",
        "silo 1: [neg, pos]",
        "silo 2: [meh, neg, pos]",
        "set --labels on every rank",
    )
    for rank, (code, output) in enumerate(silos, start=1):
        assert code == EX_CONFIG
        error_line(output, f"the aggregator refused silo {rank}", "silos disagree on the label set")
    nothing_written(tmp_path)


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_csv: Path):
    """A federation whose checkpoint to resume from is garbage."""
    workdir = tmp_path_factory.mktemp("corrupt_checkpoint")
    config = workdir / "fedsilo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "silos": 1,
                "model": str(tiny_bert),
                "dataset": str(sentiment_csv),
                "checkpoint_dir": "ckpt",
                "aggregator": f"127.0.0.1:{free_port()}",
                "join_timeout": 30,
                "round_timeout": 10,
                "rounds": 1,
            }
        )
    )
    latest = workdir / "ckpt" / settings_fingerprint(load_settings(config, {})) / "latest.pt"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"half a checkpoint")
    procs = [
        watch("aggregator", "--config", str(config), cwd=workdir),
        watch("silo", "--rank", "1", "--config", str(config), cwd=workdir),
    ]
    try:
        results = [p.result() for p in procs]
    finally:
        for p in procs:
            if p.process.poll() is None:
                p.process.kill()
    return workdir, latest, results


@pytest.mark.slow  # a federation of two processes
def test_corrupt_checkpoint_is_named_and_left_alone(corrupt_checkpoint) -> None:
    workdir, latest, ((code, output), _) = corrupt_checkpoint
    assert code == EX_CONFIG
    error_line(output, f"checkpoint {latest.relative_to(workdir)} is unreadable", "move it away")
    assert latest.read_bytes() == b"half a checkpoint"
    nothing_written(workdir, allowed=frozenset({latest}))


@pytest.mark.slow
def test_corrupt_checkpoint_stops_the_aggregator_before_it_admits_anyone(corrupt_checkpoint) -> None:
    # The checkpoint is read before the port opens: the silo never gets in, so it cannot be
    # left waiting for a verdict that never comes; it reports the absent aggregator in one line.
    _, _, ((_, agg_output), (code, output)) = corrupt_checkpoint
    assert "waiting for" not in agg_output
    assert code == EX_RETRY
    error_line(output, "cannot reach the aggregator", "within 30s")
