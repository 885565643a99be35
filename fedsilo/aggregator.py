"""Rank 0: admits the silos, runs the rounds, averages, evaluates, logs and checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedsilo import comm, join, secagg, transport
from fedsilo.averaging import Report, UpdateRejected, validate_updates
from fedsilo.client import Budget, budget
from fedsilo.config import FederationConfig, Settings, agreed_settings, settings_fingerprint
from fedsilo.data import Encoded, majority_share
from fedsilo.errors import FederationError, FedsiloError
from fedsilo.ledger import FederationRun, Outcome
from fedsilo.model import (
    architecture_fingerprint,
    bind_flat,
    build_classifier,
    flat_size,
    is_bound,
    load_flat,
    load_tokenizer,
)
from fedsilo.progress import Log
from fedsilo.runmeta import RunContext
from fedsilo.server_opt import ServerOptimizer
from fedsilo.tracking import MAJORITY_PARAM, round_metrics
from fedsilo.train import EvalResult, evaluate, resolve_device
from fedsilo.workload import aggregator_test_data


@dataclass(frozen=True)
class Rounds:
    """What the aggregator's round loop works on."""

    settings: Settings
    group: comm.Transport
    model: torch.nn.Module
    weights: torch.Tensor  # the global model, flat: best the model's own (bind_flat), updated in place
    test: Encoded | None  # None: the silos evaluate on their held-out rows
    log: Log
    privacy: Budget  # the silos' DP-SGD plans and the round the federation ends after


def _agree_on_labels(mine: list[str] | None, hellos: dict[int, join.Hello]) -> tuple[list[str], dict[int, str]]:
    """The federation's label set, and a refusal reason for each silo that disagrees."""
    if mine is None:
        votes = {tuple(h.labels or []) for h in hellos.values()}
        if len(votes) != 1:
            sets = "; ".join(f"silo {r}: [{', '.join(h.labels or [])}]" for r, h in sorted(hellos.items()))
            raise FederationError(
                f"silos disagree on the label set ({sets}); set --labels on every rank", retryable=False
            )
        mine = list(votes.pop())
    wrong = {
        r: f"its label set [{', '.join(h.labels or [])}] differs from the federation's [{', '.join(mine)}]"
        for r, h in hellos.items()
        if h.labels != mine
    }
    return mine, wrong


def _admit(
    settings: Settings, door: transport.Listener, labels: list[str] | None
) -> tuple[dict[int, join.Hello], list[str]]:
    hellos = door.admit_silos(settings.federation.join_timeout)
    try:
        labels, refusals = _agree_on_labels(labels, hellos)
    except FederationError as exc:
        for hello in hellos.values():
            door.refuse(hello, str(exc))
        raise
    mine = agreed_settings(settings)
    for rank, hello in hellos.items():
        diff = join.settings_difference(mine, hello.settings)
        if diff:
            refusals.setdefault(rank, f"its settings differ: {diff}")
    if refusals:
        summary = "; ".join(f"silo {r}: {why}" for r, why in sorted(refusals.items()))
        for rank, hello in hellos.items():
            door.refuse(hello, refusals.get(rank, f"the federation could not form ({summary})"))
        # The settings or labels differ: the same pods would be refused again.
        raise FederationError(f"refused {summary}", retryable=False)
    return hellos, labels


def serve(settings: Settings, token: str | None, log: Log = print) -> Outcome:
    """Parse is done; build, run, close. The group is destroyed on every path out."""
    fed = settings.federation
    device = resolve_device(settings.train.device)
    wire = transport.describe(settings, device)
    transport.check(settings)
    address = comm.resolve_address(fed.aggregator)
    with FederationRun(settings, settings_fingerprint(settings), log) as ledger:
        tokenizer = load_tokenizer(settings.model.model)
        test, labels = aggregator_test_data(settings, tokenizer)
        if token is None and fed.transport == "collective":
            log(
                "warning: no join token set (FEDSILO_TOKEN or --token-file): any process that reaches the port can join"
            )

        # admit the silos: authenticate, then check they agree on settings, labels and model
        door = transport.listen(settings, token, device, log)
        log(f"waiting for {fed.silos} silo(s) on {address[0]}:{address[1]} ({wire})")
        hellos, labels = _admit(settings, door, labels)
        try:
            model = build_classifier(settings, labels, tokenizer).to(device)
            arch = architecture_fingerprint(model)
            mismatched = [r for r, h in hellos.items() if h.architecture != arch]
            if mismatched:
                # With LoRA the frozen base never travels: the same files behind --model are part of the model.
                same = " (with --peft lora, the same pretrained weights too)" if settings.model.peft == "lora" else ""
                raise FederationError(
                    f"silo(s) {mismatched} built a different model from the aggregator's ({settings.model.model}){same}",
                    retryable=False,
                )
            examples = {rank: hello.train_examples for rank, hello in hellos.items()}
            privacy = budget(settings, examples)
            start = ledger.open(
                labels, flat_size(model), must_deliver=True, last_round=privacy.last_round, why=privacy.why
            )
        except FedsiloError as exc:
            # The admitted silos are blocked on their verdict: give them the reason, not a hang-up.
            for hello in hellos.values():
                door.refuse(hello, str(exc), retryable=exc.retryable)
            raise
        ledger.restore(model)
        for hello in hellos.values():
            door.welcome(hello, join.Welcome(labels, start, test is None, privacy.last_round))

        group = door.form_group(fed.round_timeout)
        try:
            # Reach MLflow once the group has formed: the silos wait in their first collective,
            # under the round timeout (which covers a round of training), not in their verdict
            # or the group's rendezvous, under the join timeout. A slow tracking server or a new
            # sqlite store on a busy machine takes tens of seconds.
            ledger.track(
                {**privacy.params(), **({} if test is None else {MAJORITY_PARAM: f"{majority_share(test):.6f}"})},
                context=RunContext(
                    "aggregator",
                    device.type,
                    "tls" if fed.transport == "tls" else wire,
                    examples,
                    None if test is None else len(test),
                    megabytes_per_silo_round(flat_size(model), fed),
                ),
            )
            if fed.secure_aggregation:
                secagg.relay(group)
                log("secure aggregation: the silos agreed pair keys; updates arrive masked")
            weights = bind_flat(model)  # the model's own storage: the global model is never copied
            if weights.device.type != group.device.type:  # gloo with a GPU model: the wire needs a CPU copy
                weights = weights.to(group.device)
            run_rounds(Rounds(settings, group, model, weights, test, log, privacy), ledger)
            return ledger.close(model, tokenizer, weights)
        finally:
            group.close()


def megabytes_per_silo_round(size: int, fed: FederationConfig) -> float:
    """One silo's traffic in a round: the global model down in float32, its update up in
    ``--transfer-dtype``, or as int64 fixed point under secure aggregation."""
    up = 8 if fed.secure_aggregation else torch.finfo(getattr(torch, fed.transfer_dtype)).bits // 8
    return size * (4 + up) / 1e6


def run_rounds(rounds: Rounds, ledger: FederationRun) -> None:
    """The FedAvg round loop, from the ledger's start round; ``rounds.weights`` is updated in place.

    With ``weights`` the model's own flat vector (:func:`~fedsilo.model.bind_flat`) the
    aggregator holds two model-sized buffers: it and the reduce's, and the server optimiser's
    state beside them (none for fedavg; see :mod:`fedsilo.server_opt`).
    """
    settings, group, model, weights, log = rounds.settings, rounds.group, rounds.model, rounds.weights, rounds.log
    fed = settings.federation
    # Secure aggregation: the reduce sums masked int64 fixed point (secagg.py), unsealed into fp32.
    wire_dtype = torch.float32 if fed.secure_aggregation else getattr(torch, fed.transfer_dtype)
    summed = torch.zeros(weights.numel(), dtype=wire_dtype, device=weights.device)
    masked = torch.zeros_like(summed, dtype=torch.int64) if fed.secure_aggregation else None
    bound = is_bound(model, weights)
    server = ServerOptimizer(settings.server, weights, ledger.server_state)
    with group.phase(f"round {ledger.start_round}: sending the global model"):
        group.broadcast_(weights)
    for round_ in range(ledger.start_round, rounds.privacy.last_round + 1):
        started = time.perf_counter()
        # local training happens on the silos; each reports its example count, loss, update norm
        with group.phase(f"round {round_}: local training"):
            reports = Report.from_rows(group.gather_rows(Report.placeholder()))

        # validate the updates before any of them is summed; each silo runs the same check on the
        # same rows and zeroes its own update if rejected, so no verdict crosses the wire
        try:
            accepted, skipped = validate_updates(reports, round_, fed.norm_factor, fed.update_policy)
        except UpdateRejected as exc:
            group.announce_abort(str(exc))
            raise FederationError(str(exc)) from None
        for reason in skipped:
            log(f"skipping an update: {reason}")

        # aggregate: one reduce brings sum_k n_k (theta_k - theta) from the accepted silos.
        # Every silo has reported, so from here the clock measures the wire, not training.
        comm_started = time.perf_counter()
        with group.phase(f"round {round_}: receiving updates"):
            group.reduce_sum_(summed if masked is None else masked)  # zero on entry: rank 0's own term
        if masked is not None:
            secagg.unseal_(summed, masked, reports, accepted)
        total = sum(r.examples for r in reports if r.rank in accepted)
        server.step(weights, summed, total)  # the server optimiser's step: fedavg adds the average

        # send the new global model: silos start the next round from it (and evaluate it)
        with group.phase(f"round {round_}: sending the global model"):
            group.broadcast_(weights)
        comm_seconds = time.perf_counter() - comm_started
        summed.zero_()  # for the next round's reduce, while the silos train
        if not bound:
            load_flat(model, weights)

        # evaluate, here or on the silos' held-out data (then each silo's own scores are logged too)
        local: dict[int, EvalResult] = {}
        if rounds.test is not None:
            result = evaluate(
                model,
                rounds.test,
                batch_size=settings.train.eval_batch_size,
                attention_mask=settings.model.attention_mask,
                fast_paths=settings.train.fast_paths,
            )
        else:
            with group.phase(f"round {round_}: evaluation on the silos"):
                rows = group.gather_rows(EvalResult.placeholder())
            result, local = EvalResult.from_rows(rows), EvalResult.per_rank(rows)

        # log and checkpoint
        metrics = round_metrics(result, reports, accepted, skipped, time.perf_counter() - started, local)
        metrics.update(comm_seconds=comm_seconds, **rounds.privacy.metrics(round_))
        ledger.record(round_, weights, metrics, server.state_dict())
