"""The replication's shipped plans: the CPU run's and the GPU plan's sweep files, and the GPU script's
wiring (sweep several cells at once, then the report) run end to end at tiny size on the CPU."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedsilo import sweep
from tests.tiny import sentiment_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_the_cpu_run_holds_its_design() -> None:
    cells = sweep.expand(sweep.read_spec(CONFIGS / "replication-steps.yaml"), "x")
    assert len(cells) == 36  # 3 seeds x 2 forms x (K = 1, 2, 4, 8, the control of 8, per-client heads at 8)
    settings = {
        (c.settings.train.batch_size, c.settings.model.max_length, c.settings.train.local_epochs) for c in cells
    }
    assert settings == {(8, 32, 2), (64, 32, 2)}  # batch 8, and the control's 8 x 8
    assert {(c.budget, c.threshold) for c in cells} == {(5, 10)}
    assert {c.settings.data.dataset for c in cells} == {"data/bbc_news_train256.csv"}
    assert {c.settings.data.test_dataset for c in cells} == {"data/bbc_news_test400.csv"}  # every seed the same rows
    controls = [c for c in cells if c.minibatch_of]
    assert len(controls) == 6 and {c.settings.federation.silos for c in controls} == {1}
    heads = [c for c in cells if c.settings.train.head_init == "per-client"]
    assert len(heads) == 6 and {c.settings.federation.silos for c in heads} == {8}
    # whole seeds first: a run stopped early has complete seeds
    assert [c.settings.train.seed for c in cells] == sorted(c.settings.train.seed for c in cells)


def test_the_gpu_plan_is_the_papers_grid_with_its_controls_and_ablations() -> None:
    spec = sweep.read_spec(CONFIGS / "replication-gpu.yaml")
    cells = sweep.expand(spec, "x")
    main = [
        c
        for c in cells
        if not c.minibatch_of and c.settings.train.head_init == "shared" and c.settings.model.attention_mask
    ]
    assert sorted({c.settings.federation.silos for c in main}) == [1, 2, 4, 8, 16, 32]
    assert {(c.settings.train.batch_size, c.settings.model.max_length, c.settings.train.lr) for c in main} == {
        (32, 128, 2e-5)
    }
    assert sorted(c.minibatch_of for c in cells if c.minibatch_of) == sorted([2, 4, 8, 16, 32] * 6)
    assert {c.settings.train.batch_size for c in cells if c.minibatch_of == 32} == {1024}
    assert any(not c.settings.model.attention_mask for c in cells) and spec.jobs > 1


def tiny_gpu_plan(directory: Path, model: Path, data: Path, test: Path) -> Path:
    """configs/replication-gpu.yaml as it ships, shrunk: one tiny model, one seed, K <= 2, 2 rounds."""
    spec: dict[str, Any] = yaml.safe_load((CONFIGS / "replication-gpu.yaml").read_text())
    spec.update(experiment="tiny-gpu", tracking_uri=f"sqlite:///{directory}/store.db", jobs=2)
    spec["settings"].update(
        dataset=str(data),
        test_dataset=str(test),
        lr=0.3,
        batch_size=8,
        max_length=16,
        device="cpu",
        budget=1,
        threshold=2,
        checkpoint_dir=str(directory / "ckpt"),
    )
    small = {1, 2, "minibatch-2"}
    for grid in spec["grid"]:
        grid.update(seed=[0], model=[str(model)], silos=[k for k in grid["silos"] if k in small] or [2])
    return write_spec(directory / "tiny-gpu.yaml", spec)


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.mark.slow  # 30 s: five tiny cells through the script; test_sweep runs two cells at once by default
def test_the_gpu_script_sweeps_cells_at_once_and_reports_them(tmp_path: Path, tiny_bert: Path) -> None:
    data = write_csv(tmp_path / "train.csv", sentiment_rows(64))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(32, seed=9))
    plan = tiny_gpu_plan(tmp_path, tiny_bert, data, test)
    env = {**os.environ, "FEDSILO_SWEEP": str(plan), "OUT": str(tmp_path / "report"), "SKIP_SETUP": "1"}
    env["PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "replicate-gpu.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "running 2 cell(s) at a time" in done.stdout and f"report in {tmp_path / 'report'}" in done.stdout
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report" / "summary.csv").read_text())))
    assert sorted(row["series"] for row in rows) == sorted(
        [
            "K = 1",
            "K = 2",
            "minibatch control of K = 2 (K = 1, batch 16)",
            "K = 2, per-client heads",
            "K = 1, no attention mask",
        ]
    )
    assert (tmp_path / "report" / "accuracy_vs_steps.png").stat().st_size > 0
