"""Reading the report's input: an experiment's finished federation runs in MLflow, as `Curve`s.

Which runs are sweep parents, and how to page through an experiment, are fedsilo.tracking's
conventions; this module only turns a run's params and metric history into a `Curve`.

Runs logged before fedsilo named models briefly have the model's path in `model` and no
`model_path`; both kinds are read, so a report may span old and new runs of one sweep.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedsilo.report.stats import cumulative_steps
from fedsilo.report.summary import Curve, ReportError
from fedsilo.runmeta import short_name
from fedsilo.tracking import MAJORITY_PARAM, MINIBATCH_PARAM, PARENT_TAG, STEPS_METRIC, redact_uri, search_all_runs

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

METRIC = "test_accuracy"


def check_sqlite_exists(uri: str) -> None:
    """Reading a sqlite URI that names no file would create an empty database there."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists():
        raise ReportError(f"no MLflow database at {uri}")


def _int_param(run: Run, name: str, default: int | None = None) -> int:
    raw = run.data.params.get(name)
    if raw is None or raw.strip() in ("", "None", "null"):
        if default is None:
            raise ReportError(f"run {run.info.run_id} has no param '{name}'")
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise ReportError(f"run {run.info.run_id}: param '{name}' = {raw!r} is not an integer")
    return int(value)


def _float_param(run: Run, name: str) -> float | None:
    """An optional number (runs logged before it existed have none)."""
    raw = run.data.params.get(name)
    try:
        return None if raw is None else float(raw)
    except ValueError:
        raise ReportError(f"run {run.info.run_id}: param '{name}' = {raw!r} is not a number") from None


def _str_param(run: Run, name: str) -> str:
    raw = run.data.params.get(name)
    if not raw:
        raise ReportError(f"run {run.info.run_id} has no param '{name}'")
    return raw


def _is_parent(run: Run) -> bool:
    return run.data.tags.get(PARENT_TAG) == "parent"


def _curve_from_run(client: MlflowClient, run: Run) -> Curve:
    rounds = _int_param(run, "rounds")
    accuracy = _by_round(client, run, METRIC)
    minibatch_of = run.data.params.get(MINIBATCH_PARAM)
    given = _str_param(run, "model")
    # New runs: `model` is the short name, `model_path` what was given. Old runs: `model` was given.
    path = run.data.params.get("model_path") or given
    return Curve(
        model=path,
        model_name=given if "model_path" in run.data.params else short_name(given),
        dataset=_str_param(run, "dataset"),
        silos=_int_param(run, "silos"),
        seed=_int_param(run, "seed"),
        num_labels=_int_param(run, "num_labels"),
        budget=_int_param(run, "budget", default=rounds),
        threshold=_int_param(run, "threshold", default=rounds),
        accuracy=accuracy,
        run_id=run.info.run_id,
        start_time=int(run.info.start_time or 0),
        majority_accuracy=_float_param(run, MAJORITY_PARAM),
        variant=variant_of(run.data.params),
        minibatch_of=None if minibatch_of is None else _int_param(run, MINIBATCH_PARAM),
        steps=cumulative_steps(_by_round(client, run, STEPS_METRIC)),
        test_examples=None if "test_examples" not in run.data.params else _int_param(run, "test_examples"),
    )


def _by_round(client: MlflowClient, run: Run, metric: str) -> dict[int, float]:
    history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.timestamp)
    # A round logged twice (a resumed federation re-evaluates it): the later value stands.
    return {int(m.step): float(m.value) for m in history}


def variant_of(params: Mapping[str, str]) -> str:
    """What sets a run apart from its model's main series (plain SGD on every weight, FedAvg), from
    its params ("" for none): the sweep's minibatch-SGD control; LoRA, the local and the server
    optimiser, DP-SGD; the ablations of the head and of the attention mask."""
    if MINIBATCH_PARAM in params:
        return f"minibatch control of K = {params[MINIBATCH_PARAM]} (K = 1, batch {params.get('batch_size', '?')})"
    parts = []
    if params.get("peft") == "lora":
        parts.append(f"LoRA r {params.get('lora_r', '?')}")
    if params.get("optimizer") == "adamw":
        parts.append(f"AdamW lr {params.get('lr', '?')}")
    if params.get("server_optimizer", "fedavg") != "fedavg":
        parts.append(params["server_optimizer"])
    if params.get("dp_epsilon") not in (None, "", "None"):  # MLflow keeps None as ""
        parts.append(f"DP epsilon {params['dp_epsilon']}")
    if params.get("head_init") == "per-client":
        parts.append("per-client heads")
    if params.get("attention_mask") == "False":
        parts.append("no attention mask")
    return ", ".join(parts)


def load_curves(client: MlflowClient, experiment: str, uri: str) -> tuple[list[Curve], Run | None]:
    """The finished federation runs of `experiment` as curves, and its most recent parent run.

    A federation run is any run that is not a sweep parent and has a `silos` param; the parent
    may still be running (a sweep reports before it ends).
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"experiment '{experiment}' not found at {redact_uri(uri)}")
    runs = search_all_runs(client, exp.experiment_id)
    parents = sorted((r for r in runs if _is_parent(r)), key=lambda r: r.info.start_time or 0)
    members = [r for r in runs if not _is_parent(r) and r.info.status == "FINISHED" and "silos" in r.data.params]
    if not members:
        raise ReportError(f"experiment '{experiment}' has no finished federation runs to report on")
    return [_curve_from_run(client, r) for r in members], (parents[-1] if parents else None)
