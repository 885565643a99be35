"""Tests for fedsilo.report: the pure summary arithmetic by hand, then one real MLflow sweep."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedsilo.errors import FedsiloError
from fedsilo.report import (
    BASELINE_AT_CHANCE,
    MAJORITY_LABEL,
    NO_BASELINE,
    NOT_REACHED,
    RANDOM_LABEL,
    Curve,
    ReportError,
    csv_text,
    latest_per_seed,
    markdown_text,
    mean_curve,
    rounds_to_target,
    summarise,
    write_report,
)
from fedsilo.report.runs import _float_param
from fedsilo.tracking import redact_uri

MAJORITY = "test_majority_accuracy"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ramp(n: int, step: float = 0.1) -> dict[int, float]:
    """Accuracy r * step at round r = 1..n (0.1, 0.2, ... with the default)."""
    return {r: round(r * step, 10) for r in range(1, n + 1)}


def curve(
    accuracy: dict[int, float],
    *,
    model: str = "bert",
    dataset: str = "imdb",
    silos: int = 1,
    seed: int = 0,
    num_labels: int = 2,
    budget: int | None = None,
    threshold: int | None = None,
    run_id: str = "",
    start_time: int = 0,
    majority: float | None = None,
    model_name: str = "",
) -> Curve:
    last = max(accuracy, default=0)
    return Curve(
        model=model,
        dataset=dataset,
        silos=silos,
        seed=seed,
        num_labels=num_labels,
        budget=last if budget is None else budget,
        threshold=last if threshold is None else threshold,
        accuracy=accuracy,
        run_id=run_id,
        start_time=start_time,
        majority_accuracy=majority,
        model_name=model_name,
    )


# --- rounds_to_target ---------------------------------------------------------------------------


def test_rounds_to_target_first_round_reaching_target() -> None:
    assert rounds_to_target(ramp(10), target=0.7, threshold=10) == 7
    assert rounds_to_target(ramp(10), target=0.65, threshold=10) == 7


def test_rounds_to_target_never_reached() -> None:
    assert rounds_to_target(ramp(8), target=0.95, threshold=10) is None  # tops out at 0.8


def test_rounds_to_target_after_threshold_counts_as_not_reached() -> None:
    assert rounds_to_target(ramp(10), target=0.7, threshold=6) is None
    assert rounds_to_target(ramp(10), target=0.7, threshold=7) == 7  # the threshold round counts


def test_rounds_to_target_first_crossing_even_if_it_dips_later() -> None:
    assert rounds_to_target({1: 0.2, 2: 0.8, 3: 0.3, 4: 0.9}, target=0.75, threshold=4) == 2


def test_rounds_to_target_float_rounding_does_not_miss_target() -> None:
    target = 0.9 * 0.8  # 0.7200000000000001
    assert rounds_to_target({1: 0.5, 2: 0.72}, target=target, threshold=2) == 2


def test_rounds_to_target_ignores_step_order() -> None:
    assert rounds_to_target({3: 0.9, 1: 0.1, 2: 0.8}, target=0.8, threshold=3) == 2


# --- mean_curve and latest_per_seed ---------------------------------------------------------------


def test_mean_curve_averages_rounds_all_seeds_logged() -> None:
    got = mean_curve([{1: 0.2, 2: 0.4, 3: 0.6}, {1: 0.4, 2: 0.6}])
    assert got.keys() == {1, 2}
    assert got[1] == pytest.approx(0.3)
    assert got[2] == pytest.approx(0.5)
    assert mean_curve([]) == {}


def test_latest_per_seed_keeps_most_recent_run_of_a_repeated_seed() -> None:
    old = curve(ramp(3), seed=1, run_id="old", start_time=100)
    new = curve(ramp(3), seed=1, run_id="new", start_time=200)
    other = curve(ramp(3), seed=2, run_id="other", start_time=50)

    kept, superseded = latest_per_seed([new, other, old])

    assert {c.run_id for c in kept} == {"new", "other"}
    assert [c.run_id for c in superseded] == ["old"]


# --- summarise ------------------------------------------------------------------------------------


def test_summarise_single_seed_per_k() -> None:
    # K = 1 ends at 0.8 -> target 0.72; K = 2 is 0.1 r -> first >= 0.72 at round 8; K = 4 is
    # 0.12 r capped at 0.75 -> 0.72 at round 6; K = 8 stays at 0.5.
    base = curve({r: min(0.5 + 0.05 * r, 0.8) for r in range(1, 11)}, silos=1)
    k2 = curve(ramp(10), silos=2)
    k4 = curve({r: min(0.12 * r, 0.75) for r in range(1, 11)}, silos=4)
    k8 = curve({r: 0.5 for r in range(1, 11)}, silos=8)

    rows = summarise([k8, k2, base, k4])

    assert [r.silos for r in rows] == [1, 2, 4, 8]
    one, two, four, eight = rows
    assert one.accuracy_at_budget == pytest.approx(0.8)
    assert one.target_accuracy == pytest.approx(0.72)
    assert one.rounds_to_target == 5  # 0.5 + 0.05 * 5 = 0.75 is the first >= 0.72
    assert two.rounds_to_target == 8
    assert two.accuracy_at_budget == pytest.approx(1.0)
    assert four.rounds_to_target == 6
    assert four.best_accuracy == pytest.approx(0.75)
    assert four.best_round == 7  # 0.84 capped to 0.75 first at round 7
    assert eight.rounds_to_target is None
    assert eight.rounds_text == NOT_REACHED
    assert all(r.accuracy_at_budget_std is None for r in rows)  # one seed: no std


def test_summarise_crosses_target_at_round_7() -> None:
    base = curve({1: 0.5, 2: 0.9, 3: 0.9}, silos=1)  # target 0.81
    fed = curve({1: 0.5, 2: 0.6, 3: 0.7, 4: 0.75, 5: 0.78, 6: 0.80, 7: 0.81, 8: 0.85}, silos=2)

    rows = summarise([base, fed])

    assert rows[1].target_accuracy == pytest.approx(0.81)
    assert rows[1].rounds_to_target == 7
    assert rows[1].rounds_text == "7"


def test_summarise_averages_seeds_and_uses_mean_curve_for_rounds() -> None:
    # K = 1 seeds end at 0.8 and 0.9: mean 0.85, sample std 0.0707..., target 0.765.
    base = [
        curve({1: 0.6, 2: 0.8}, silos=1, seed=0),
        curve({1: 0.6, 2: 0.9}, silos=1, seed=1),
    ]
    # K = 2: seed 0 reaches 0.765 at round 2, seed 1 at round 4; their mean at round 3.
    fed = [
        curve({1: 0.5, 2: 0.8, 3: 0.8, 4: 0.8}, silos=2, seed=0),
        curve({1: 0.5, 2: 0.6, 3: 0.74, 4: 0.8}, silos=2, seed=1),
    ]

    one, two = summarise(base + fed)

    assert one.seeds == (0, 1)
    assert one.accuracy_at_budget == pytest.approx(0.85)
    assert one.accuracy_at_budget_std == pytest.approx(math.sqrt(0.005))
    assert one.target_accuracy == pytest.approx(0.765)
    assert two.mean_curve[3] == pytest.approx(0.77)
    assert two.rounds_to_target == 3
    assert two.accuracy_at_budget == pytest.approx(0.8)
    assert two.accuracy_at_budget_std == pytest.approx(0.0)


def test_summarise_without_k1_run_has_no_baseline() -> None:
    rows = summarise([curve(ramp(10), silos=2), curve(ramp(10), model="albert", silos=1)])

    bert = next(r for r in rows if r.model == "bert")
    assert bert.target_accuracy is None
    assert bert.rounds_to_target is None
    assert bert.rounds_text == NO_BASELINE
    albert = next(r for r in rows if r.model == "albert")
    assert albert.rounds_text == "9"  # its own baseline: 0.9 * 1.0


def test_summarise_reads_accuracy_at_budget_not_at_last_round() -> None:
    # The paper: K > 1 runs go on to a second threshold (here 20) but are compared at 10.
    base = curve(ramp(10, 0.08), silos=1)  # 0.8 at round 10, target 0.72
    fed = curve(ramp(20, 0.04), silos=4, budget=10, threshold=20)  # 0.4 at 10, 0.72 at 18

    _, four = summarise([base, fed])

    assert four.accuracy_at_budget == pytest.approx(0.4)
    assert four.best_accuracy == pytest.approx(0.8)
    assert four.best_round == 20
    assert four.rounds_to_target == 18


def test_summarise_missing_budget_round_gives_no_accuracy() -> None:
    short = curve(ramp(5), silos=1, budget=10)

    (row,) = summarise([short])

    assert row.accuracy_at_budget is None
    assert row.rounds_text == NO_BASELINE  # a K = 1 run without accuracy at its budget


def test_summarise_seeds_disagreeing_on_budget_raise() -> None:
    with pytest.raises(ReportError, match="disagree on budget"):
        summarise([curve(ramp(10), seed=0, budget=10), curve(ramp(10), seed=1, budget=5)])


def test_summarise_dataset_disagreeing_on_num_labels_raises() -> None:
    with pytest.raises(FedsiloError, match="num_labels"):
        summarise([curve(ramp(3), silos=1, num_labels=2), curve(ramp(3), silos=2, num_labels=3)])


# --- tables and helpers ------------------------------------------------------------------------


def test_csv_and_markdown_spell_out_unavailable_values() -> None:
    rows = summarise(
        [
            curve(ramp(10), silos=1),
            curve({r: 0.5 for r in range(1, 11)}, silos=2),
            curve(ramp(10), dataset="ag_news", num_labels=4, silos=2),
        ]
    )

    table = list(csv.DictReader(io.StringIO(csv_text(rows))))
    md = markdown_text("exp", rows, ["a.png"])

    by_key = {(r["dataset"], r["silos"]): r for r in table}
    assert by_key[("imdb", "2")]["rounds_to_target"] == NOT_REACHED
    assert by_key[("ag_news", "2")]["rounds_to_target"] == NO_BASELINE
    assert by_key[("ag_news", "2")]["random_accuracy"] == "0.250000"
    assert by_key[("imdb", "1")]["accuracy_at_budget_std"] == ""
    assert "## ag_news" in md and "## imdb" in md
    assert NOT_REACHED in md and NO_BASELINE in md and "![a.png](a.png)" in md


def test_the_floor_is_the_majority_class_where_the_runs_logged_it() -> None:
    # IMDB-like runs logged a test set that is 70 % one label; AG News runs (older) logged none;
    # two SST runs disagree (different test sets): no single majority to draw.
    rows = summarise(
        [
            curve(ramp(10), silos=1, majority=0.7),
            curve(ramp(10), silos=2, majority=0.7),
            curve(ramp(10), dataset="ag_news", num_labels=4),
            curve(ramp(10), dataset="sst", seed=0, majority=0.6),
            curve(ramp(10), dataset="sst", seed=1, majority=0.55),
            # one dataset, one floor: a model whose runs logged none leaves every row without it
            curve(ramp(10), dataset="yelp", model="bert", majority=0.4),
            curve(ramp(10), dataset="yelp", model="albert"),
        ]
    )
    assert [r.chance for r in rows if r.dataset == "yelp"] == [(0.5, RANDOM_LABEL)] * 2
    by_dataset = {r.dataset: r for r in rows}
    assert by_dataset["imdb"].chance == (0.7, MAJORITY_LABEL)
    assert by_dataset["ag_news"].chance == (0.25, RANDOM_LABEL)
    assert by_dataset["sst"].majority_accuracy is None and by_dataset["sst"].chance == (0.5, RANDOM_LABEL)
    table = {(r["dataset"], r["silos"]): r for r in csv.DictReader(io.StringIO(csv_text(rows)))}
    assert (
        table[("imdb", "2")]["majority_accuracy"] == "0.700000"
        and table[("imdb", "2")]["random_accuracy"] == "0.500000"
    )
    assert table[("ag_news", "1")]["majority_accuracy"] == ""
    md = markdown_text("exp", rows, [])
    assert "2 labels; always answering the test set's most frequent label (the majority class) scores 0.7000" in md
    assert "4 labels; a uniform random guess scores 0.2500." in md


def test_an_unreadable_floor_param_names_the_run_and_param() -> None:
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1"), data=SimpleNamespace(params={MAJORITY: "half"}))
    with pytest.raises(ReportError, match=r"^run r1: param 'test_majority_accuracy' = 'half' is not a number$"):
        _float_param(run, MAJORITY)  # type: ignore[arg-type]
    assert _float_param(SimpleNamespace(info=run.info, data=SimpleNamespace(params={})), MAJORITY) is None  # type: ignore[arg-type]


def test_a_k1_baseline_at_or_below_chance_gives_no_rounds_to_target() -> None:
    # Prepare: K = 1 ends at the majority class (0.6): 90% of it is reached by answering one class
    at_majority = [curve({1: 0.55, 2: 0.6}, majority=0.6), curve({1: 0.6, 2: 0.6}, silos=2, majority=0.6)]
    # ... and without a logged majority, a uniform guess over two labels is the floor
    at_uniform = [curve({1: 0.5}), curve({1: 0.5}, silos=4)]

    for curves in (at_majority, at_uniform):
        # Execute
        rows = summarise(curves)

        # Assert
        assert [(r.rounds_to_target, r.target_accuracy, r.rounds_text) for r in rows] == [
            (None, None, BASELINE_AT_CHANCE)
        ] * 2
        assert BASELINE_AT_CHANCE in markdown_text("x", rows, [])
        assert [row["rounds_to_target"] for row in csv.DictReader(io.StringIO(csv_text(rows)))] == [
            BASELINE_AT_CHANCE
        ] * 2
    # a baseline above the floor still sets a target
    (one, two) = summarise([curve({1: 0.7}, majority=0.6), curve({1: 0.65}, silos=2, majority=0.6)])
    assert (one.rounds_to_target, two.rounds_to_target) == (1, 1)


def test_models_are_shown_by_short_name_unless_two_share_it() -> None:
    rows = summarise(
        [
            curve(ramp(3), model="data/minilm"),
            curve(ramp(3), model="/elsewhere/minilm"),
            curve(ramp(3), model="org/tiny-bert-model", model_name="tiny"),
            curve(ramp(3), model="sentence-transformers/all-MiniLM-L6-v2"),
        ]
    )
    assert {r.model: r.name for r in rows} == {
        "data/minilm": "data/minilm",
        "/elsewhere/minilm": "/elsewhere/minilm",
        "org/tiny-bert-model": "tiny",
        "sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
    }
    table = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert {(row["model"], row["model_path"]) for row in table} >= {("tiny", "org/tiny-bert-model")}


def test_csv_and_markdown_list_the_same_seeds() -> None:
    rows = summarise([curve(ramp(3), seed=0), curve(ramp(3), seed=2), curve(ramp(3), seed=1)])
    (row,) = csv.DictReader(io.StringIO(csv_text(rows)))
    assert row["seeds"] == "0 1 2"
    assert "| bert | K = 1 | 0 1 2 |" in markdown_text("x", rows, [])


def test_old_and_new_runs_name_their_model_alike() -> None:
    from fedsilo.report.runs import _curve_from_run

    client: Any = SimpleNamespace(get_metric_history=lambda run_id, key: [])
    common = {"dataset": "d", "silos": "1", "seed": "0", "num_labels": "2", "rounds": "2"}
    old = {**common, "model": "data/minilm"}  # before short names: the path as given
    new = {**common, "model": "minilm", "model_path": "data/minilm"}
    for params in (old, new):
        run: Any = SimpleNamespace(info=SimpleNamespace(run_id="r", start_time=0), data=SimpleNamespace(params=params))
        found = _curve_from_run(client, run)
        assert (found.model, found.name) == ("data/minilm", "minilm")


def test_figures_name_models_briefly_and_count_rounds_in_whole_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsilo.report import figures

    drawn: list[Any] = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    rows = summarise([curve(ramp(3), model="data/minilm"), curve(ramp(3), model="data/minilm", silos=2)])
    figures.plot_accuracy_vs_rounds(rows, tmp_path / "a.png")
    figures.plot_rounds_to_target(rows, tmp_path / "b.png")
    by_rounds, to_target = drawn
    panel = by_rounds.axes[0]
    assert panel.get_title() == "minilm · imdb"
    by_rounds.canvas.draw()
    assert all(float(tick).is_integer() for tick in panel.get_xticks())
    to_target.canvas.draw()
    assert all(float(tick).is_integer() for tick in to_target.axes[0].get_yticks())
    legend = [t.get_text() for t in to_target.legends[0].get_texts()]
    assert "minilm" in legend and "data/minilm" not in legend


def test_redact_uri_hides_password_only() -> None:
    uri = "https://u:secret@mlflow.example:5000/x"
    assert redact_uri(uri) == "https://u:***@mlflow.example:5000/x"
    assert redact_uri("sqlite:///tmp/m.db") == "sqlite:///tmp/m.db"
    # in a message that quotes the URL (MLflow's errors do), every password goes
    said = "API request to http://u:p%40ss@h:5000/api failed; retry https://v:w@h2/x"
    assert redact_uri(said) == "API request to http://u:***@h:5000/api failed; retry https://v:***@h2/x"


# --- write_report against a real MLflow store ----------------------------------------------------

EXPERIMENT = "sweep-test"
# Two models x K in {1, 2, 4} on IMDB (2 labels), 10 rounds each; targets worked out by hand.
SWEEP: dict[tuple[str, int], list[float]] = {
    # baseline 0.88 -> target 0.792: reached at round 5
    ("bert", 1): [0.55, 0.62, 0.70, 0.76, 0.80, 0.83, 0.85, 0.86, 0.87, 0.88],
    ("bert", 2): [0.50, 0.55, 0.60, 0.66, 0.70, 0.74, 0.78, 0.80, 0.82, 0.84],  # round 8
    ("bert", 4): [0.50, 0.50, 0.52, 0.55, 0.58, 0.61, 0.64, 0.67, 0.70, 0.72],  # not reached
    # baseline 0.86 (best 0.88 at round 9) -> target 0.774: reached at round 3
    ("distilbert", 1): [0.60, 0.70, 0.78, 0.82, 0.85, 0.86, 0.87, 0.87, 0.88, 0.86],
    ("distilbert", 2): [0.50, 0.52, 0.58, 0.65, 0.71, 0.75, 0.78, 0.80, 0.81, 0.82],  # round 7
    ("distilbert", 4): [0.50] * 10,  # stuck at the random classifier
}
EXPECTED_ROUNDS = {
    ("bert", 1): "5",
    ("bert", 2): "8",
    ("bert", 4): NOT_REACHED,
    ("distilbert", 1): "3",
    ("distilbert", 2): "7",
    ("distilbert", 4): NOT_REACHED,
}


def _log_run(
    client: Any,
    experiment_id: str,
    params: dict[str, str],
    tags: dict[str, str],
    accuracy: list[float],
    status: str = "FINISHED",
) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, tags=tags)
    run_id: str = run.info.run_id
    metrics = [Metric("test_accuracy", a, 1_000 + r, r) for r, a in enumerate(accuracy, start=1)]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A sqlite MLflow store holding a parent run, its 6 children and one failed child."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/m.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "art").as_uri())
    parent = client.create_run(exp_id, tags={"fedsilo.sweep": "parent"}).info.run_id
    child_tags = {"mlflow.parentRunId": parent}
    for (model, k), acc in SWEEP.items():
        params = {
            "model": model,
            "dataset": "imdb",
            "silos": str(k),
            "rounds": "10",
            "seed": "0",
            "num_labels": "2",
            "budget": "None",
            "test_majority_accuracy": "0.600000",
        }
        _log_run(client, exp_id, params, child_tags, acc)
    # A crashed run must not count: it would pull bert K = 4 to 0.1.
    crashed = {
        "model": "bert",
        "dataset": "imdb",
        "silos": "4",
        "rounds": "10",
        "seed": "1",
        "num_labels": "2",
    }
    _log_run(client, exp_id, crashed, child_tags, [0.1, 0.1], status="FAILED")
    # The parent is still running, as it is when a sweep reports before it ends.

    empty_id = client.create_experiment("empty", artifact_location=(root / "art2").as_uri())
    client.create_run(empty_id, tags={"fedsilo.sweep": "parent"})
    return {"uri": uri, "parent": parent}


def test_write_report_from_mlflow(store: dict[str, str], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "report"

    result = write_report(EXPERIMENT, store["uri"], out)

    assert result.runs == 6
    assert result.parent_run_id == store["parent"]
    table = list(csv.DictReader(result.summary_csv.open(encoding="utf-8")))
    assert len(table) == 6
    for row in table:
        logged = SWEEP[(row["model"], int(row["silos"]))]
        assert row["dataset"] == "imdb"
        assert row["budget"] == "10" and row["threshold"] == "10"
        assert float(row["accuracy_at_budget"]) == pytest.approx(logged[-1])
        assert float(row["best_accuracy"]) == pytest.approx(max(logged))
        assert int(row["best_round"]) == logged.index(max(logged)) + 1
        assert row["rounds_to_target"] == EXPECTED_ROUNDS[(row["model"], int(row["silos"]))]
        assert float(row["random_accuracy"]) == pytest.approx(0.5)
        assert float(row["majority_accuracy"]) == pytest.approx(0.6)
    bert_target = next(r for r in table if r["model"] == "bert")["target_accuracy"]
    assert float(bert_target) == pytest.approx(0.9 * 0.88)

    md = result.summary_md.read_text(encoding="utf-8")
    assert "sweep-test" in md and "| bert | K = 4 | 0 |" in md and NOT_REACHED in md

    names = {p.name for p in result.figures}
    assert names == {"accuracy_vs_clients.png", "rounds_to_target.png", "accuracy_vs_rounds.png"}
    for png in result.figures:
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert len(data) > 20_000, f"{png.name} is suspiciously small"

    client = MlflowClient(tracking_uri=store["uri"])
    artifacts = {Path(f.path).name for f in client.list_artifacts(store["parent"], "report")}
    assert artifacts == {"summary.md", "summary.csv", "paired.csv", "equal_steps.csv", *names}


def test_unknown_experiment_is_a_user_error(store: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(FedsiloError, match="experiment 'nope' not found at sqlite:///"):
        write_report("nope", store["uri"], tmp_path)


def test_experiment_without_finished_runs_is_a_user_error(store: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(FedsiloError, match="no finished federation runs"):
        write_report("empty", store["uri"], tmp_path)


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"

    with pytest.raises(FedsiloError, match="no MLflow database"):
        write_report(EXPERIMENT, f"sqlite:///{db}", tmp_path)

    assert not db.exists()
