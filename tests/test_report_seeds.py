"""The report's statistics over seeds, worked by hand: t-intervals, the test set's binomial error,
rounds to target seed by seed, paired differences, the step axis; then the same through MLflow."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import pytest

from fedsilo.report import Curve, markdown_text, summarise, write_report
from fedsilo.report.compare import at_equal_steps, paired_differences, step_curves
from fedsilo.report.runs import variant_of
from fedsilo.report.stats import binomial_se, cumulative_steps, t975, t_interval
from fedsilo.report.tables import steps_csv


def run(
    accuracy: list[float],
    *,
    model: str = "bert",
    silos: int = 1,
    seed: int = 0,
    budget: int = 2,
    steps_per_round: int | None = None,
    variant: str = "",
    minibatch_of: int | None = None,
    test_examples: int | None = 400,
) -> Curve:
    per_round = 64 // silos if steps_per_round is None else steps_per_round
    rounds = range(1, len(accuracy) + 1)
    return Curve(
        model=model,
        dataset="bbc",
        silos=silos,
        seed=seed,
        num_labels=5,
        budget=budget,
        threshold=len(accuracy),
        accuracy=dict(zip(rounds, accuracy, strict=True)),
        majority_accuracy=0.23,
        variant=variant,
        minibatch_of=minibatch_of,
        steps={r: r * per_round for r in rounds},
        test_examples=test_examples,
    )


# --- the statistics ---------------------------------------------------------------------------------


def test_t_quantiles_come_from_the_table_and_continue_smoothly_beyond_it() -> None:
    assert (t975(1), t975(2), t975(30)) == (12.7062, 4.3027, 2.0423)
    # exact values from any table: t(0.975; 40) = 2.0211, t(0.975; 120) = 1.9799
    assert t975(40) == pytest.approx(2.0211, abs=1e-4) and t975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t975(30) > t975(31) > t975(1000) > 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_a_t_interval_by_hand() -> None:
    # mean 0.84, sample sd 0.04, n 3: half-width 4.3027 * 0.04 / sqrt(3)
    interval = t_interval([0.80, 0.84, 0.88])
    assert interval.mean == pytest.approx(0.84) and interval.n == 3
    assert interval.half_width == pytest.approx(4.3027 * 0.04 / math.sqrt(3))
    assert interval.text() == "0.8400 ± 0.0994"
    one = t_interval([0.7])
    assert one.half_width is None and one.text() == "0.7000"  # one seed: no spread to estimate


def test_the_binomial_error_of_a_test_set() -> None:
    assert binomial_se(0.8, 400) == pytest.approx(0.02)  # sqrt(0.8 * 0.2 / 400)
    assert binomial_se(0.5, 100) == pytest.approx(0.05)


def test_steps_add_up_round_by_round_and_stop_at_a_gap() -> None:
    assert cumulative_steps({1: 8.0, 2: 8.0, 3: 8.0}) == {1: 8, 2: 16, 3: 24}
    assert cumulative_steps({2: 8.0, 1: 4.0}) == {1: 4, 2: 12}
    assert cumulative_steps({1: 8.0, 3: 8.0}) == {1: 8}  # round 3's start is not known
    assert cumulative_steps({}) == {}


# --- rows over seeds --------------------------------------------------------------------------------


def test_rows_carry_the_interval_the_test_error_and_each_seeds_rounds_to_target() -> None:
    baseline = [run([0.6, 0.8, 0.9], seed=s) for s in (0, 1, 2)]  # 0.8 at the budget: target 0.72
    k4 = [
        run([0.5, 0.7, 0.75], silos=4, seed=0),  # round 3
        run([0.73, 0.8, 0.9], silos=4, seed=1),  # round 1
        run([0.3, 0.4, 0.5], silos=4, seed=2),  # not reached
    ]
    k8 = [run([0.2, 0.3, 0.8], silos=8, seed=s) if s == 0 else run([0.2, 0.3, 0.4], silos=8, seed=s) for s in (0, 1, 2)]
    rows = {r.silos: r for r in summarise(baseline + k4 + k8)}
    four = rows[4]
    assert four.accuracy_at_budget == pytest.approx((0.7 + 0.8 + 0.4) / 3)
    assert four.accuracy_at_budget_ci == pytest.approx(t_interval([0.7, 0.8, 0.4]).half_width)
    assert four.binomial_se == pytest.approx(binomial_se(four.accuracy_at_budget, 400))
    assert four.seed_rounds == (3, 1, None)
    assert four.reached_text == "reached 2/3, median 3"  # 1, 3, never: the middle one is 3
    assert rows[8].seed_rounds == (3, None, None) and rows[8].reached_text == "reached 1/3"  # median: never
    assert rows[1].reached_text == "reached 3/3, median 2"
    md = markdown_text("x", list(rows.values()), [])
    assert "| bert | K = 4 | 0 1 2 | 0.6333 ± " in md and "reached 2/3, median 3 |" in md
    assert "0.0241 (n = 400)" in md  # sqrt(0.6333 * 0.3667 / 400)


def test_ablations_and_controls_are_rows_of_their_own_and_never_the_baseline() -> None:
    main = [run([0.6, 0.8], seed=s) for s in (0, 1)] + [run([0.3, 0.5], silos=8, seed=s) for s in (0, 1)]
    heads = [run([0.2, 0.25], silos=8, seed=s, variant="per-client heads") for s in (0, 1)]
    control = [
        run([0.95, 0.99], seed=s, steps_per_round=8, variant="minibatch control of K = 8", minibatch_of=8)
        for s in (0, 1)
    ]
    rows = summarise(main + heads + control)
    labels = [r.label for r in rows]
    assert labels == ["K = 1", "K = 8", "minibatch control of K = 8", "K = 8, per-client heads"]
    # the target is 90% of the main K = 1 (0.8), not of the control at K = 1 (0.99)
    assert [r.target_accuracy for r in rows] == [pytest.approx(0.72)] * 4


# --- comparisons ------------------------------------------------------------------------------------


def test_paired_differences_pair_seeds_between_models_and_against_the_main_series() -> None:
    curves = [
        run([0.7, 0.80], seed=0),
        run([0.7, 0.90], seed=1),
        run([0.6, 0.70], model="distil", seed=0),
        run([0.6, 0.75], model="distil", seed=1),
        run([0.6, 0.60], model="distil", seed=2),  # no bert seed 2 to pair with: left out
        run([0.1, 0.40], silos=8, seed=0),
        run([0.1, 0.50], silos=8, seed=1),
        run([0.1, 0.20], silos=8, seed=0, variant="per-client heads"),
        run([0.1, 0.40], silos=8, seed=1, variant="per-client heads"),
        run([0.1, 0.45], seed=0, steps_per_round=8, variant="minibatch control of K = 8", minibatch_of=8),
    ]
    pairs = {(p.first, p.second): p for p in paired_differences(curves)}
    models = pairs[("bert: K = 1", "distil: K = 1")]
    assert models.seeds == (0, 1) and models.difference.mean == pytest.approx(0.125)  # (0.10 + 0.15) / 2
    assert models.difference.half_width == pytest.approx(t_interval([0.10, 0.15]).half_width)
    heads = pairs[("bert: K = 8, per-client heads", "bert: K = 8")]
    assert heads.difference.mean == pytest.approx(-0.15) and heads.seeds == (0, 1)
    control = pairs[("bert: minibatch control of K = 8", "bert: K = 8")]
    assert control.difference.mean == pytest.approx(0.05) and control.seeds == (0,)


def test_every_series_meets_k1_where_their_steps_are_equal() -> None:
    # K = 1 takes 64 steps a round, K = 4 16 and K = 8 8: K = 4's round 4 and K = 8's round 8
    # have taken K = 1's round 1's 64 steps
    curves = [run([0.5 + 0.1 * r for r in range(4)], seed=s) for s in (0, 1)]
    curves += [run([0.1 * r for r in range(1, 9)], silos=8, seed=s) for s in (0, 1)]
    curves += [run([0.2, 0.3, 0.4, 0.5 + 0.02 * s], silos=4, seed=s) for s in (0, 1)]
    points = {(a.series, a.steps): a for a in at_equal_steps(curves)}
    assert set(points) == {("K = 8", 64), ("K = 4", 64)}
    eight = points[("K = 8", 64)]
    assert (eight.round_, eight.baseline_round) == (8, 1)
    assert eight.accuracy.mean == pytest.approx(0.8) and eight.baseline.mean == pytest.approx(0.5)
    assert eight.difference.mean == pytest.approx(0.3) and eight.difference.half_width == pytest.approx(0.0)
    four = points[("K = 4", 64)]
    assert four.round_ == 4 and four.difference.mean == pytest.approx(0.01)
    table = list(csv.DictReader(io.StringIO(steps_csv(at_equal_steps(curves)))))
    assert {(row["series"], row["round"], row["baseline_round"]) for row in table} == {
        ("K = 8", "8", "1"),
        ("K = 4", "4", "1"),
    }


def test_the_step_axis_puts_each_round_at_its_steps_with_the_seeds_interval() -> None:
    curves = [run([0.5, 0.7], seed=0), run([0.7, 0.9], seed=1), run([0.2, 0.4], silos=8, seed=0)]
    panels = step_curves(curves)
    (panel,) = panels.values()
    assert [(s, a.mean) for s, a in panel["K = 1"]] == [(64, pytest.approx(0.6)), (128, pytest.approx(0.8))]
    assert panel["K = 1"][0][1].half_width == pytest.approx(t_interval([0.5, 0.7]).half_width)
    assert [s for s, _ in panel["K = 8"]] == [8, 16]


def test_a_runs_variant_is_read_from_its_params() -> None:
    main = {"head_init": "shared", "attention_mask": "True", "batch_size": "8"}
    assert variant_of(main) == ""
    assert variant_of({**main, "head_init": "per-client"}) == "per-client heads"
    assert variant_of({**main, "attention_mask": "False"}) == "no attention mask"
    assert (
        variant_of({**main, "minibatch_of": "8", "batch_size": "64"}) == "minibatch control of K = 8 (K = 1, batch 64)"
    )
    assert variant_of({"batch_size": "8"}) == ""  # runs logged before these settings existed
    modern = {**main, "peft": "lora", "lora_r": "8", "optimizer": "adamw", "lr": "0.001", "server_optimizer": "fedadam"}
    assert variant_of(modern) == "LoRA r 8, AdamW lr 0.001, fedadam"
    assert variant_of({**main, "optimizer": "sgd", "server_optimizer": "fedavg", "dp_epsilon": ""}) == ""
    assert variant_of({**main, "dp_epsilon": "8.0"}) == "DP epsilon 8.0"


# --- through MLflow ---------------------------------------------------------------------------------


def _log(client: Any, experiment_id: str, params: dict[str, str], accuracy: list[float], steps: int) -> None:
    from mlflow.entities import Metric, Param

    run_id = client.create_run(experiment_id).info.run_id
    metrics = [Metric("test_accuracy", a, 1_000 + r, r) for r, a in enumerate(accuracy, start=1)]
    metrics += [Metric("local_steps", float(steps), 1_000 + r, r) for r in range(1, len(accuracy) + 1)]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id, status="FINISHED")


def test_a_report_from_mlflow_has_the_step_axis_the_control_and_the_paired_table(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("steps", artifact_location=(tmp_path / "art").as_uri())
    common = {"model": "bert", "dataset": "bbc", "rounds": "4", "num_labels": "5", "budget": "2"}
    common.update(test_examples="400", test_majority_accuracy="0.23", head_init="shared", attention_mask="True")
    for seed in (0, 1):
        base = {**common, "seed": str(seed), "batch_size": "8"}
        _log(client, experiment_id, {**base, "silos": "1"}, [0.7 + 0.05 * seed, 0.8, 0.85, 0.9], 64)
        _log(client, experiment_id, {**base, "silos": "8"}, [0.2, 0.3, 0.4, 0.5 + 0.05 * seed], 8)
        _log(client, experiment_id, {**base, "silos": "8", "head_init": "per-client"}, [0.2, 0.2, 0.25, 0.3], 8)
        control = {**base, "silos": "1", "batch_size": "64", "minibatch_of": "8"}
        _log(client, experiment_id, control, [0.25, 0.35, 0.45, 0.5], 8)
    result = write_report("steps", uri, tmp_path / "out")

    labels = [r.label for r in result.rows]
    assert labels == [
        "K = 1",
        "K = 8",
        "minibatch control of K = 8 (K = 1, batch 64)",
        "K = 8, per-client heads",
    ]
    assert {p.name for p in result.figures} >= {"accuracy_vs_steps.png", "accuracy_vs_clients.png"}
    # K = 8's round 8 would meet K = 1's round 1; with 4 rounds there is no equal step count
    steps = list(csv.DictReader(io.StringIO((tmp_path / "out" / "equal_steps.csv").read_text())))
    assert steps == []
    paired = list(csv.DictReader(io.StringIO((tmp_path / "out" / "paired.csv").read_text())))
    heads = next(row for row in paired if row["first"] == "bert: K = 8, per-client heads")
    assert (heads["second"], heads["seeds"]) == ("bert: K = 8", "0 1") and float(heads["difference"]) == pytest.approx(
        -0.1
    )
    summary = list(csv.DictReader(io.StringIO(result.summary_csv.read_text())))
    assert [row["binomial_se"] for row in summary][0] == f"{binomial_se(0.8, 400):.6f}"
    md = result.summary_md.read_text()
    assert "## Paired differences at the budget" in md and "reached 2/2, median 1" in md


def test_a_report_of_variants_alone_pairs_each_with_the_nearest_series_it_adds_to(tmp_path: Path) -> None:
    # Prepare: LoRA + AdamW with and without DP-SGD, no plain-SGD main series (the privacy run's shape)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("dp", artifact_location=(tmp_path / "art").as_uri())
    common = {"model": "bert", "dataset": "rt", "rounds": "3", "num_labels": "2", "silos": "4", "peft": "lora"}
    common.update(lora_r="8", optimizer="adamw", lr="0.001", test_examples="400", head_init="shared")
    for seed in (0, 1):
        base = {**common, "seed": str(seed)}
        _log(client, experiment_id, base, [0.6, 0.7, 0.75 + 0.01 * seed], 16)
        _log(client, experiment_id, {**base, "dp_epsilon": "8.0"}, [0.5, 0.5, 0.5 + 0.01 * seed], 16)
    # Execute
    result = write_report("dp", uri, tmp_path / "out")
    # Assert: the step figure alone (the paper's three plot the main series), DP paired with non-private LoRA
    assert [p.name for p in result.figures] == ["accuracy_vs_steps.png"]
    paired = list(csv.DictReader(io.StringIO((tmp_path / "out" / "paired.csv").read_text())))
    assert [(row["first"], row["second"]) for row in paired] == [
        ("bert: K = 4, LoRA r 8, AdamW lr 0.001, DP epsilon 8.0", "bert: K = 4, LoRA r 8, AdamW lr 0.001")
    ]
    assert float(paired[0]["difference"]) == pytest.approx(-0.25)
