"""fedsilo.sweep: grid expansion and validation, then real sweeps of tiny simulations in MLflow."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fedsilo import sweep
from fedsilo.cli import app
from fedsilo.errors import EX_CONFIG, ConfigError, FedsiloError
from fedsilo.report import write_report
from fedsilo.tracking import CELL_TAG, PARENT_RUN_TAG, PARENT_TAG
from tests.procs import kill_tree, watch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_spec(directory: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


# --- the sweep file ----------------------------------------------------------------------------


def test_grid_expands_in_order_with_per_dataset_budgets(tmp_path) -> None:
    spec = sweep.read_spec(
        write_spec(
            tmp_path,
            {
                "settings": {"lr": 0.1, "max-length": 64},
                "grid": {"model": ["m1", "m2"], "dataset": ["a.csv", "b.csv"], "silos": [1, 4]},
                "per_dataset": {"a.csv": {"budget": 3, "threshold": 6}, "b.csv": {"rounds": 2}},
            },
        )
    )
    cells = sweep.expand(spec, "exp")
    assert [c.label() for c in cells[:3]] == [
        "model=m1 dataset=a.csv silos=1",
        "model=m1 dataset=a.csv silos=4",
        "model=m1 dataset=b.csv silos=1",
    ]
    assert len(cells) == 8 and len({c.key for c in cells}) == 8
    a, b = cells[0], cells[2]
    assert (a.settings.federation.rounds, a.params()) == (6, {"budget": 3, "threshold": 6})
    assert (b.settings.federation.rounds, b.params()) == (2, {})
    assert a.settings.model.max_length == 64 and a.settings.train.lr == 0.1
    assert a.settings.tracking.experiment == "exp"


def test_cell_key_follows_the_result_not_the_place() -> None:
    def key(**settings: Any) -> str:
        spec = sweep.SweepSpec(settings={"dataset": "a.csv", **settings}, grid={"silos": [2]})
        return sweep.expand(spec, "e")[0].key

    assert key() == key(device="cpu", eval_batch_size=7, checkpoint_dir="elsewhere")
    assert key() != key(lr=0.5)
    assert key() != key(budget=5, rounds=10) != key(rounds=10)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"grid": {"sylos": [1, 2]}}, "grid.sylos: unknown key"),
        ({"grid": {"silos": 4}}, "grid.silos: Input should be a valid list"),
        ({"grid": {"silos": []}}, "grid.silos: empty list"),
        (
            {"grid": {"silos": [1]}, "settings": {"experiment": "x"}},
            "settings.experiment: set 'experiment' at the top level",
        ),
        ({"grid": {"silos": [1]}, "settings": {"silos": 2}}, "grid.silos: also set under settings"),
        ({"grid": {"silos": [1]}, "parallel": True}, "parallel: Extra inputs are not permitted"),
        ({"grid": {"dataset": ["imdb"]}, "per_dataset": {"imbd": {"rounds": 3}}}, "per_dataset.imbd: no such dataset"),
        ({"grid": {"silos": [0, 2]}, "settings": {"dataset": "a"}}, "cell 1/2 (silos=0): invalid setting 'silos'"),
        (
            {"grid": {"silos": [1]}, "settings": {"dataset": "a", "rounds": 5, "budget": 8}},
            "budget 8 is after the last round (5)",
        ),
        (
            {"grid": {"silos": [1]}, "settings": {"dataset": "a", "rounds": 5, "threshold": 8}},
            "rounds (5) and threshold (8) disagree",
        ),
        ({"grid": {"silos": [2, 2]}, "settings": {"dataset": "a"}}, "cell 2/2 (silos=2): the same run as cell 1"),
        ({"grid": [{"silos": [1]}, {"sylos": [2]}]}, "grid[1].sylos: unknown key"),
        ({"grid": [{"silos": [1]}, {"silos": 2}]}, "grid[1].silos: Input should be a valid list"),
        ({"grid": []}, "grid: empty list"),
        ({"grid": {"silos": ["minibatch-1"]}, "settings": {"dataset": "a"}}, "'minibatch-1' is not a control"),
        ({"grid": {"silos": ["minibatch-x"]}, "settings": {"dataset": "a"}}, "write minibatch-K with K >= 2"),
        (
            {
                "grid": [{"silos": [1], "batch_size": [256]}, {"silos": ["minibatch-8"]}],
                "settings": {"dataset": "a"},  # the default batch, 32, times 8
            },
            "cell 2/2 (silos=minibatch-8): the same run as cell 1",
        ),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, spec, message) -> None:
    path = write_spec(tmp_path, spec)
    with pytest.raises(ConfigError) as caught:
        sweep.expand(sweep.read_spec(path), "e")
    assert message in str(caught.value)


def test_cli_bad_file_is_one_line_and_dry_run_touches_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = CliRunner().invoke(app, ["sweep", "--config", str(write_spec(tmp_path, {"grid": {"sylos": [1]}}))])
    assert bad.exit_code == EX_CONFIG and "Traceback" not in bad.output
    assert len(bad.stderr.strip().splitlines()) == 1 and "grid.sylos: unknown key" in bad.stderr

    good = write_spec(tmp_path, {"settings": {"dataset": "a.csv"}, "grid": {"silos": [1, 2, 4]}}, "good.yaml")
    listed = CliRunner().invoke(app, ["sweep", "--config", str(good), "--dry-run"])
    assert listed.exit_code == 0, listed.output
    assert "cell 3/3: silos=4 (rounds=10)" in listed.output and "experiment 'good'" in listed.output
    assert not (tmp_path / "mlflow.db").exists()


def test_an_estimate_times_one_probe_per_workload_and_records_nothing(
    tmp_path, monkeypatch, tiny_bert, sentiment_csv
) -> None:
    # Prepare: three cells of one workload (K changes what each client trains, not the round's work)
    monkeypatch.chdir(tmp_path)
    spec = write_spec(
        tmp_path,
        {
            "settings": {"model": str(tiny_bert), "dataset": str(sentiment_csv), "rounds": 2},
            "grid": {"silos": [1, 2, 4]},
        },
        "estimate.yaml",
    )
    from fedsilo import estimate

    probes: list[Any] = []
    real_probe = estimate.probe
    monkeypatch.setattr(estimate, "probe", lambda settings: probes.append(settings) or real_probe(settings))

    # Execute
    listed = CliRunner().invoke(app, ["sweep", "--config", str(spec), "--estimate"])

    # Assert: one probe, an estimate per cell (the same: the same work) and in all, no store
    assert listed.exit_code == 0, listed.output
    assert len(probes) == 1
    guesses = [line.split("about ")[1] for line in listed.output.splitlines() if line.startswith("cell ")]
    assert len(guesses) == 3 and len(set(guesses)) == 1, listed.output
    assert "about " in listed.output.splitlines()[-1] and "nothing was recorded" in listed.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def test_an_estimate_probes_the_cells_own_round_lora_and_dp_included(tiny_bert, sentiment_csv) -> None:
    from fedsilo import estimate
    from fedsilo.config import build_settings

    base = {"model": str(tiny_bert), "dataset": str(sentiment_csv), "batch_size": 8}
    full, lora = build_settings(base), build_settings({**base, "peft": "lora"})
    private = build_settings({**base, "peft": "lora", "dp_epsilon": 8.0, "dp_delta": 1e-3})
    assert len({estimate.workload_key(s) for s in (full, lora, private)}) == 3
    assert estimate.workload_key(full) == estimate.workload_key(build_settings({**base, "silos": 4}))
    for settings in (lora, private):
        speed = estimate.probe(settings)
        assert speed.train_row > 0 and speed.eval_row > 0 and speed.cell_seconds(settings) > 0


def test_paper_grid() -> None:
    cells = sweep.expand(sweep.read_spec(CONFIGS / "paper.yaml"), "paper")
    assert len(cells) == 3 * 3 * 6
    assert {c.settings.model.model for c in cells} == {"bert-base-cased", "albert-base-v2", "distilbert-base-cased"}
    assert sorted({c.settings.federation.silos for c in cells}) == [1, 2, 4, 8, 16, 32]
    plan = {(c.settings.data.dataset, c.budget, c.threshold, c.settings.federation.rounds) for c in cells}
    assert plan == {("imdb", 100, 200, 200), ("yelp_review_full", 50, 100, 100), ("ag_news", 100, 200, 200)}
    s = cells[0].settings
    assert (s.train.lr, s.train.batch_size, s.model.max_length, s.train.local_epochs, s.data.partition) == (
        2e-5,
        32,
        128,
        2,
        "iid",
    )


@pytest.mark.parametrize(
    "name",
    [
        "sweep-example.yaml",
        "replication-cpu.yaml",
        "replication-pilot.yaml",
        "replication-steps.yaml",
        "replication-gpu.yaml",
        "peft-accuracy.yaml",
        "replication-mask.yaml",
    ],
)
def test_shipped_sweep_files_are_valid(name) -> None:
    cells = sweep.expand(sweep.read_spec(CONFIGS / name), "x")
    assert cells and all(c.budget is None or c.budget <= c.settings.federation.rounds for c in cells)
    if name != "peft-accuracy.yaml":  # that one compares optimisers at one K, not K against K = 1
        assert any(c.settings.federation.silos == 1 for c in cells)  # the baseline the report needs


def test_grids_in_a_list_are_their_union_and_the_controls_change_only_what_they_claim() -> None:
    spec = sweep.SweepSpec(
        settings={"dataset": "a.csv", "batch_size": 8, "lr": 0.03},
        grid=[
            {"seed": [0, 1], "silos": [1, 8, "minibatch-8"]},
            {"seed": [0], "silos": [8], "head_init": ["per-client"]},
        ],
    )
    cells = sweep.expand(spec, "e")
    assert [c.label() for c in cells] == [
        "seed=0 silos=1",
        "seed=0 silos=8",
        "seed=0 silos=minibatch-8",
        "seed=1 silos=1",
        "seed=1 silos=8",
        "seed=1 silos=minibatch-8",
        "seed=0 silos=8 head_init=per-client",
    ]
    by_label = {c.label(): c for c in cells}

    def differences(a: sweep.Cell, b: sweep.Cell) -> dict[str, tuple[Any, Any]]:
        one, two = a.settings.flat(), b.settings.flat()
        return {k: (one.get(k), two.get(k)) for k in one.keys() | two.keys() if one.get(k) != two.get(k)}

    # the minibatch control of K = 8: one client at 8 x the batch, nothing else changed
    control, eight = by_label["seed=0 silos=minibatch-8"], by_label["seed=0 silos=8"]
    assert differences(control, eight) == {"silos": (1, 8), "batch_size": (64, 8)}
    assert control.params() == {"minibatch_of": 8} and eight.params() == {}
    # the head ablation: only the head's initialisation
    ablation = by_label["seed=0 silos=8 head_init=per-client"]
    assert differences(ablation, eight) == {"head_init": ("per-client", "shared")}
    # and the parent run names every grid
    params = sweep.sweep_params(spec.model_dump(mode="json"), len(cells))
    assert params["grid/1/head_init"] == '["per-client"]' and params["grid/0/silos"] == '[1, 8, "minibatch-8"]'


# --- real sweeps ---------------------------------------------------------------------------------


def tiny_sweep(directory: Path, model: Path, data: Path) -> Path:
    return write_spec(
        directory,
        {
            "experiment": "tiny",
            "tracking_uri": f"sqlite:///{directory}/mlflow.db",
            "settings": {
                "model": str(model),
                "dataset": str(data),
                "batch_size": 16,
                "lr": 0.3,
                "local_epochs": 1,
                "checkpoint_dir": str(directory / "ckpt"),
            },
            "grid": {"silos": [1, 2]},
            "per_dataset": {str(data): {"budget": 1, "threshold": 2}},
        },
    )


def runs_of(directory: Path) -> tuple[list[Any], list[Any]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{directory}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags.get(PARENT_TAG) == "parent"]
    return parents, [r for r in runs if r not in parents]


def test_sweep_nests_its_cells_and_a_rerun_trains_nothing(tmp_path, tiny_bert, sentiment_csv) -> None:
    # Execute
    path = tiny_sweep(tmp_path, tiny_bert, sentiment_csv)
    lines: list[str] = []
    sweep.run_sweep(path, log=lines.append)
    # Assert: one parent, a FINISHED child per cell with the report's params
    (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.data.tags[PARENT_RUN_TAG] == parent.info.run_id and c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["silos"] for c in children) == ["1", "2"]
    # the parent says what the sweep is: its shared settings, grid, overrides and size
    params = parent.data.params
    assert (params["grid/silos"], params["cells"], params["lr"], params["model"]) == (
        "[1, 2]",
        "2",
        "0.3",
        str(tiny_bert),
    )
    assert json.loads(params["per_dataset"]) == {str(sentiment_csv): {"budget": 1, "threshold": 2}}
    assert (
        "A sweep of 2 federation(s)" in parent.data.tags["mlflow.note.content"] and parent.data.tags["fedsilo.version"]
    )
    assert sorted(c.info.run_name for c in children) == [f"K={k} {tiny_bert.name} sentiment seed=0" for k in (1, 2)]
    assert all(
        (c.data.params["budget"], c.data.params["threshold"], c.data.params["rounds"]) == ("1", "2", "2")
        for c in children
    )
    assert not list((tmp_path / "ckpt").glob("*/latest.pt"))  # the models are in MLflow
    assert (
        "cell 2/2: silos=2" in lines
        and lines[-1] == f"summarise it: fedsilo report --experiment tiny --tracking-uri sqlite:///{tmp_path}/mlflow.db"
    )

    # a rerun of the same sweep continues the same parent and trains nothing
    again: list[str] = []
    sweep.run_sweep(path, log=again.append)
    (parent_again,), children_again = runs_of(tmp_path)
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert {c.info.run_id for c in children_again} == {c.info.run_id for c in children}
    assert "2 finished already, 0 to run" in again[0]
    assert sum("finished already (run" in line for line in again) == 2


def test_cells_run_at_once_each_in_its_own_process(tmp_path, tiny_bert, sentiment_csv, capfd) -> None:
    path = tiny_sweep(tmp_path, tiny_bert, sentiment_csv)
    lines: list[str] = []
    sweep.run_sweep(path, jobs=2, log=lines.append)
    (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "FINISHED" and sorted(c.data.params["silos"] for c in children) == ["1", "2"]
    assert all(c.data.tags[PARENT_RUN_TAG] == parent.info.run_id and c.info.status == "FINISHED" for c in children)
    assert lines[1].startswith("running 2 cell(s) at a time, ")
    assert sum("test_accuracy=" in line and "cells finished" in line for line in lines) == 2
    # the cells' own lines come from the worker processes' stdout, not through this process's log
    workers = capfd.readouterr().out
    assert "[1/2] round 2/2" in workers and "[2/2] round 2/2" in workers
    assert not any("round 2/2" in line for line in lines)


def test_a_partly_finished_sweep_reruns_only_the_missing_cells(monkeypatch, tmp_path, tiny_bert, sentiment_csv) -> None:
    # Prepare: the K = 2 cell fails the first time
    path = tiny_sweep(tmp_path, tiny_bert, sentiment_csv)
    real_simulate = sweep.simulate
    trained: list[int] = []

    def flaky(settings, log, **kw):
        trained.append(settings.federation.silos)
        if settings.federation.silos == 2 and trained.count(2) == 1:
            raise FedsiloError("silo 2 is unreachable")
        return real_simulate(settings, log, **kw)

    monkeypatch.setattr(sweep, "simulate", flaky)
    with pytest.raises(sweep.SweepError, match=r"1 of 2 cell\(s\) failed.*cell 2 \(silos=2\): silo 2 is unreachable"):
        sweep.run_sweep(path, log=lambda line: None)
    (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "FAILED" and [c.data.params["silos"] for c in children] == ["1"]
    # Execute
    sweep.run_sweep(path, log=lambda line: None)
    # Assert: only the missing cell trained, under the same parent; the report sees both
    assert trained == [1, 2, 2]
    (parent_again,), children = runs_of(tmp_path)
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert sorted(c.data.params["silos"] for c in children) == ["1", "2"]
    # the parent says what the sweep is: its shared settings, grid, overrides and size
    params = parent.data.params
    assert (params["grid/silos"], params["cells"], params["lr"], params["model"]) == (
        "[1, 2]",
        "2",
        "0.3",
        str(tiny_bert),
    )
    assert json.loads(params["per_dataset"]) == {str(sentiment_csv): {"budget": 1, "threshold": 2}}
    assert (
        "A sweep of 2 federation(s)" in parent.data.tags["mlflow.note.content"] and parent.data.tags["fedsilo.version"]
    )
    assert sorted(c.info.run_name for c in children) == [f"K={k} {tiny_bert.name} sentiment seed=0" for k in (1, 2)]
    assert all(c.data.tags[CELL_TAG] for c in children)
    report = write_report("tiny", f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "report")
    assert [(r.silos, r.budget, r.threshold) for r in report.rows] == [(1, 1, 2), (2, 1, 2)]
    assert report.parent_run_id == parent.info.run_id


def test_a_sweep_stopped_with_sigterm_closes_its_runs(tmp_path, tiny_bert, sentiment_csv) -> None:
    # Prepare: a sweep whose first cell runs long enough to be stopped mid-round
    spec = yaml.safe_load(tiny_sweep(tmp_path, tiny_bert, sentiment_csv).read_text())
    spec["settings"]["local_epochs"] = 20
    path = write_spec(tmp_path, spec)
    sweeping = watch("sweep", "--config", str(path), cwd=tmp_path)
    try:
        sweeping.wait_for("MLflow run ")  # the cell's run exists; its training has begun
        # Execute: what `kill` and Kubernetes send
        sweeping.process.send_signal(signal.SIGTERM)
        code, out = sweeping.result()
    finally:
        kill_tree(sweeping.process)
    # Assert: the command says so, and no run is left RUNNING: the parent and the cell are KILLED
    assert code == 130 and "fedsilo: interrupted" in out and "Traceback" not in out, out
    (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED"]
