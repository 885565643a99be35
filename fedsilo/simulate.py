"""K clients in one process on one device: the federation without the network.

Each round the clients train one after another with the same :func:`~fedsilo.train.local_train`
seeds as the distributed silos (client k: ``(seed, k, round)``, on shard k of the same
partition), and the aggregator's averaging functions combine them, so ``fedsilo simulate`` and
``fedsilo run`` end with the same global model. Memory does not grow with K beyond the data:
three model-sized vectors whatever K: the model itself (bound to one flat vector that every
client trains in), the global weights and one running weighted sum (and the server optimiser's
state, as on the aggregator: see :mod:`fedsilo.server_opt`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedsilo.averaging import Report, Rows, UpdateRejected, take_update, validate_updates
from fedsilo.client import Budget, budget, train_round
from fedsilo.config import Settings
from fedsilo.data import Encoded, majority_share
from fedsilo.errors import ConfigError, FederationError
from fedsilo.ledger import FederationRun, Outcome, simulation_key
from fedsilo.model import bind_flat, build_classifier, flat_size, load_tokenizer, offset_in
from fedsilo.progress import Log, batch_progress
from fedsilo.runmeta import RunContext
from fedsilo.server_opt import ServerOptimizer
from fedsilo.tracking import MAJORITY_PARAM, round_metrics
from fedsilo.train import evaluate, resolve_device
from fedsilo.workload import client_shards, shared_dataset


@dataclass(frozen=True)
class Clients:
    """What the simulation's round loop works on."""

    settings: Settings
    model: torch.nn.Module
    local: torch.Tensor  # the model's own flat vector (bind_flat): each client trains in it
    weights: torch.Tensor  # the global model, flat, updated in place
    shards: list[Encoded]  # client k's training rows are shards[k - 1]
    test: Encoded
    log: Log
    privacy: Budget  # the clients' DP-SGD plans and the round the federation ends after


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
        raise ConfigError(
            "simulate splits one --dataset among the clients: choose --partition iid, "
            "label-sorted or dirichlet (none means each silo brings its own data)"
        )
    device = resolve_device(settings.train.device)
    with FederationRun(settings, simulation_key(settings, parent_run_id), log, parent_run_id=parent_run_id) as ledger:
        tokenizer = load_tokenizer(settings.model.model)
        shards, test, labels = client_shards(settings, tokenizer, settings.federation.silos)
        model = build_classifier(settings, labels, tokenizer).to(device)
        if settings.federation.transfer_dtype != "float32":
            log(
                f"note: simulate sums updates in float32; transfer_dtype={settings.federation.transfer_dtype} "
                "only changes what travels in `fedsilo run`"
            )
        if settings.federation.secure_aggregation:
            log(
                "note: simulate has no aggregator to hide updates from and sums them in the clear; "
                "--secure-aggregation masks them in `fedsilo run`, `aggregator` and `silo` (the same model within 1e-6)"
            )
        examples = {k: len(shard) for k, shard in enumerate(shards, 1)}
        privacy = budget(settings, examples)
        ledger.open(labels, flat_size(model), last_round=privacy.last_round, why=privacy.why)
        ledger.restore(model)
        sizes = sorted(len(s) for s in shards)
        log(
            f"simulating {len(shards)} client(s) on {device}: {sum(sizes)} training examples "
            f"({sizes[0]} to {sizes[-1]} per client), {len(test)} test examples"
        )

        ledger.track(
            {MAJORITY_PARAM: f"{majority_share(test):.6f}", **privacy.params(), **(params or {})},
            tags,
            RunContext("simulate", device.type, None, examples, len(test)),
        )
        local = bind_flat(model)  # the model's own storage: each client trains in it
        weights = local.clone()
        run_rounds(Clients(settings, model, local, weights, shards, test, log, privacy), ledger)
        return ledger.close(model, tokenizer, weights)  # run_rounds leaves the global model in it


def run_rounds(clients: Clients, ledger: FederationRun) -> None:
    """The FedAvg round loop with the clients in turn, from the ledger's start round;
    ``clients.local`` holds the global model again after each round."""
    settings, weights, log = clients.settings, clients.weights, clients.log
    fed = settings.federation
    summed = torch.zeros_like(weights)  # sum_k n_k (theta_k - theta), as the aggregator's reduce
    server = ServerOptimizer(settings.server, weights, ledger.server_state)
    ranks = range(1, len(clients.shards) + 1)
    for round_ in range(ledger.start_round, clients.privacy.last_round + 1):
        started = time.perf_counter()
        # local training, one client after another, each adding n_k (theta_k - theta) to the sum
        summed.zero_()
        reports = [train_client(clients, k, round_, summed) for k in ranks]

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
                train_client(clients, k, round_, summed)

        # aggregate: the server optimiser's step to the new global model, then into the one model
        # for evaluation
        total = sum(r.examples for r in reports if r.rank in accepted)
        server.step(weights, summed, total)
        clients.local.copy_(weights)

        # evaluate on the shared test set
        result = evaluate(
            clients.model,
            clients.test,
            batch_size=settings.train.eval_batch_size,
            attention_mask=settings.model.attention_mask,
            fast_paths=settings.train.fast_paths,
        )

        # log and checkpoint (the aggregator's metric names, less the wire's)
        metrics = round_metrics(result, reports, accepted, skipped, time.perf_counter() - started)
        metrics.update(clients.privacy.metrics(round_))
        ledger.record(round_, weights, metrics, server.state_dict())


def train_client(clients: Clients, k: int, round_: int, summed: torch.Tensor) -> Report:
    """Client k's round, as silo k runs it: start from the global model, train, add its update.

    ``clients.local`` is the model's flat vector: it must hold the global model on entry, and
    holds it again on return."""
    settings, local, data = clients.settings, clients.local, clients.shards[k - 1]
    if clients.privacy.sits_out(k, round_):  # its budget is spent (--dp-on-exhausted skip)
        return Report(k, len(data), 0.0, 0.0, sits_out=1)
    progress = batch_progress(clients.log, f"round {round_}: client {k}/{len(clients.shards)}")
    result = train_round(settings, clients.model, data, k, round_, progress)
    # the update theta_k - theta, formed in the model's own buffer as a silo forms it, added to
    # the sum, and the buffer back to the global model for the next client. Embedding rows none
    # of this client's tokens reached are the global model's still (plain SGD, sparse gradients):
    # they are skipped, half of MiniLM for a client with a few thousand distinct tokens.
    rows = [
        Rows(offset_in(local, table), (table.shape[0], table.shape[1]), index)
        for table, index in result.changed_rows
        if 2 * index.numel() < table.shape[0]
    ]
    norm = take_update(summed, local, clients.weights, len(data), rows)
    return Report(k, len(data), result.mean_loss, norm, result.seconds, result.steps)
