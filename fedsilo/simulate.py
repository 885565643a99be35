"""K clients in one process on one device: the federation without the network.

Each round the clients train one after another with the same :func:`~fedsilo.train.local_train`
seeds as the distributed silos (client k: ``(seed, k, round)``, on shard k of the same
partition), and the aggregator's averaging functions combine them, so ``fedsilo simulate`` and
``fedsilo run`` end with the same global model. Memory does not grow with K beyond the data:
three model-sized vectors whatever K: the model itself (bound to one flat vector that every
client trains in), the global weights and one running weighted sum.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedsilo import checkpoint
from fedsilo.averaging import Report, Rows, UpdateRejected, finish_average, take_update, validate_updates
from fedsilo.config import Settings
from fedsilo.data import Encoded, majority_share
from fedsilo.errors import ConfigError, FederationError
from fedsilo.model import bind_flat, build_model, load_flat, load_tokenizer, offset_in
from fedsilo.tracking import MAJORITY_PARAM, Tracker, round_line, round_metrics
from fedsilo.train import evaluate, local_train, resolve_device
from fedsilo.workload import client_shards, settings_fingerprint, shared_dataset

Log = Callable[[str], None]
# Within a round, report a client's progress at most this often (a round of 32 BERT clients on
# a large dataset takes hours; one line per round alone would look like a hang).
PROGRESS_SECONDS = 15.0


@dataclass(frozen=True)
class Outcome:
    run_id: str | None  # None only if MLflow was unreachable throughout (see Tracker)
    final_accuracy: float
    weights: torch.Tensor  # the final global model, flat, on the CPU


def checkpoint_key(settings: Settings, parent_run_id: str | None = None) -> str:
    """Where a simulation checkpoints: apart from ``fedsilo run`` federations with the same
    settings, and per MLflow experiment and sweep, so a resume never continues another's run."""
    blob = json.dumps([settings_fingerprint(settings), settings.tracking.tracking_uri,
                       settings.tracking.experiment, parent_run_id])
    return "simulate-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def simulate(
    settings: Settings,
    log: Log = print,
    *,
    parent_run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Outcome:
    """Parse is done; build, run, close. K is ``settings.federation.silos``.

    ``parent_run_id``, ``params`` and ``tags`` go to the MLflow run (see :class:`Tracker`); a
    sweep uses them to nest its cells.
    """
    if not shared_dataset(settings):
        raise ConfigError("simulate splits one --dataset among the clients: choose --partition iid, "
                          "label-sorted or dirichlet (none means each silo brings its own data)")
    device = resolve_device(settings.train.device)
    directory = settings.checkpoint.checkpoint_dir
    checkpoint.ensure_writable(directory)
    tokenizer = load_tokenizer(settings.model.model)
    shards, test, labels = client_shards(settings, tokenizer, settings.federation.silos)
    model = build_model(settings.model.model, labels, settings.train.seed).to(device)
    if settings.federation.transfer_dtype != "float32":
        log(f"note: simulate sums updates in float32; transfer_dtype={settings.federation.transfer_dtype} "
            "only changes what travels in `fedsilo run`")

    key = checkpoint_key(settings, parent_run_id)
    resumed = checkpoint.load(directory, key)
    outbox = checkpoint.checkpoint_path(directory, key).parent

    run_params = {MAJORITY_PARAM: f"{majority_share(test):.6f}", **(params or {})}

    def tracker_for(run_id: str | None) -> Tracker:
        return Tracker(settings, labels, run_id, outbox, log, parent_run_id=parent_run_id,
                       params=run_params, tags={"fedsilo.mode": "simulate", **(tags or {})})

    if resumed is not None and resumed.round >= settings.federation.rounds:
        # That simulation finished: deliver what MLflow missed of it, then start a new one.
        tracker_for(resumed.run_id).finish()
        resumed = None
    if resumed is not None:
        load_flat(model, resumed.weights.to(device))
        log(f"resuming after round {resumed.round} from {checkpoint.checkpoint_path(directory, key)}")
    sizes = sorted(len(s) for s in shards)
    log(f"simulating {len(shards)} client(s) on {device}: {sum(sizes)} training examples "
        f"({sizes[0]} to {sizes[-1]} per client), {len(test)} test examples")

    tracker = tracker_for(resumed.run_id if resumed else None)
    try:
        log(tracker.ui_hint())
        local = bind_flat(model)  # the model's own storage: each client trains in it
        weights = local.clone()
        start = resumed.round + 1 if resumed else 1
        final = run_rounds(settings, model, local, weights, shards, test, tracker, start, key, labels, log)
        tracker.log_model(model, tokenizer)  # run_rounds leaves the global model in it
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish()
    log(f"done: {tracker.ui_hint()}")
    return Outcome(tracker.run_id, final, weights.cpu())


def run_rounds(
    settings: Settings,
    model: torch.nn.Module,
    local: torch.Tensor,
    weights: torch.Tensor,
    shards: list[Encoded],
    test: Encoded,
    tracker: Tracker,
    start: int,
    key: str,
    labels: list[str],
    log: Log,
) -> float:
    """The FedAvg round loop with the clients in turn; ``weights`` is the global model, updated
    in place, and ``local`` the model's flat vector (:func:`~fedsilo.model.bind_flat`), which
    holds the global model again after each round. Returns the test accuracy after the last round."""
    fed = settings.federation
    summed = torch.zeros_like(weights)  # sum_k n_k (theta_k - theta), as the aggregator's reduce
    clients = range(1, len(shards) + 1)
    accuracy = float("nan")
    for round_ in range(start, fed.rounds + 1):
        started = time.perf_counter()
        # local training, one client after another, each adding n_k (theta_k - theta) to the sum
        summed.zero_()
        reports = [train_client(settings, model, local, weights, shards, k, round_, summed, log) for k in clients]

        # validate the updates: a rejected one is already in the sum, so rebuild the sum from the
        # accepted clients (training is seeded: a replay gives the same update) rather than keep
        # K updates in memory
        try:
            accepted, skipped = validate_updates(reports, round_, fed.norm_factor, fed.update_policy)
        except UpdateRejected as exc:
            raise FederationError(str(exc)) from None
        for reason in skipped:
            log(f"skipping an update: {reason}")
        if skipped:
            summed.zero_()
            for k in accepted:
                train_client(settings, model, local, weights, shards, k, round_, summed, log)

        # aggregate: the new global model, then into the one model for evaluation
        total = sum(r.examples for r in reports if r.rank in accepted)
        finish_average(weights, summed, total)
        local.copy_(weights)

        # evaluate on the shared test set
        result = evaluate(model, test, batch_size=settings.train.eval_batch_size,
                          attention_mask=settings.model.attention_mask)
        accuracy = result.accuracy

        # log and checkpoint (the aggregator's metric names, less the wire's)
        metrics = round_metrics(result, reports, accepted, skipped, time.perf_counter() - started)
        tracker.log_round(round_, metrics)
        checkpoint.save(settings.checkpoint.checkpoint_dir,
                        checkpoint.Checkpoint(round_, weights, tracker.run_id, labels, key))
        log(round_line(round_, fed.rounds, metrics))
    return accuracy


def train_client(
    settings: Settings,
    model: torch.nn.Module,
    local: torch.Tensor,
    weights: torch.Tensor,
    shards: list[Encoded],
    k: int,
    round_: int,
    summed: torch.Tensor,
    log: Log,
) -> Report:
    """Client k's round, as silo k runs it: start from the global model, train, add its update.

    ``local`` is the model's flat vector: it must hold the global model on entry, and holds it
    again on return."""
    train, data = settings.train, shards[k - 1]
    last = [time.monotonic()]

    def progress(done: int, total: int, loss: float) -> None:
        if time.monotonic() - last[0] > PROGRESS_SECONDS:
            last[0] = time.monotonic()
            log(f"round {round_}: client {k}/{len(shards)} batch {done}/{total} loss {loss:.4f}")

    result = local_train(
        model, data, epochs=train.local_epochs, batch_size=train.batch_size, lr=train.lr,
        seed=(train.seed, k, round_), attention_mask=settings.model.attention_mask,
        group_by_length=train.group_by_length, progress=progress,
    )
    # the update theta_k - theta, formed in the model's own buffer as a silo forms it, added to
    # the sum, and the buffer back to the global model for the next client. Embedding rows none
    # of this client's tokens reached are the global model's still (plain SGD, sparse gradients):
    # they are skipped, half of MiniLM for a client with a few thousand distinct tokens.
    rows = [Rows(offset_in(local, table), (table.shape[0], table.shape[1]), index)
            for table, index in result.changed_rows if 2 * index.numel() < table.shape[0]]
    norm = take_update(summed, local, weights, len(data), rows)
    return Report(k, len(data), result.mean_loss, norm)
