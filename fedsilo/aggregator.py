"""Rank 0: admits the silos, runs the rounds, averages, evaluates, logs and checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedsilo import checkpoint, comm, join
from fedsilo.averaging import REPORT_FIELDS, UpdateRejected, finish_average, read_reports, validate_updates
from fedsilo.config import Settings
from fedsilo.data import Encoded, majority_share
from fedsilo.errors import FederationError, FedsiloError
from fedsilo.model import architecture_fingerprint, bind_flat, build_model, flat_size, is_bound, load_flat, load_tokenizer
from fedsilo.tracking import MAJORITY_PARAM, Tracker, round_line, round_metrics
from fedsilo.train import EvalResult, evaluate, resolve_device
from fedsilo.workload import agreed_settings, aggregator_test_data, settings_fingerprint

Log = Callable[[str], None]

# Layout of the evaluation rows silos send when they evaluate (see silo.py).
EVAL_FIELDS = ("examples", "loss_sum", "correct")


@dataclass(frozen=True)
class Outcome:
    run_id: str
    final_accuracy: float
    weights: torch.Tensor


def _agree_on_labels(mine: list[str] | None, hellos: dict[int, join.Hello]) -> tuple[list[str], dict[int, str]]:
    """The federation's label set, and a refusal reason for each silo that disagrees."""
    if mine is None:
        votes = {tuple(h.labels or []) for h in hellos.values()}
        if len(votes) != 1:
            sets = "; ".join(f"silo {r}: [{', '.join(h.labels or [])}]" for r, h in sorted(hellos.items()))
            raise FederationError(f"silos disagree on the label set ({sets}); set --labels on every rank")
        mine = list(votes.pop())
    wrong = {r: f"its label set [{', '.join(h.labels or [])}] differs from the federation's [{', '.join(mine)}]"
             for r, h in hellos.items() if h.labels != mine}
    return mine, wrong


def _admit(
    settings: Settings, store: Any, token: str | None, labels: list[str] | None, log: Log
) -> tuple[dict[int, join.Hello], list[str]]:
    hellos = join.admit_silos(store, settings.federation.silos, token, settings.federation.join_timeout, log)
    try:
        labels, refusals = _agree_on_labels(labels, hellos)
    except FederationError as exc:
        for hello in hellos.values():
            join.refuse(store, hello, str(exc))
        raise
    mine = agreed_settings(settings)
    for rank, hello in hellos.items():
        diff = join.settings_difference(mine, hello.settings)
        if diff:
            refusals.setdefault(rank, f"its settings differ: {diff}")
    if refusals:
        summary = "; ".join(f"silo {r}: {why}" for r, why in sorted(refusals.items()))
        for rank, hello in hellos.items():
            join.refuse(store, hello, refusals.get(rank, f"the federation could not form ({summary})"))
        raise FederationError(f"refused {summary}")
    return hellos, labels


def serve(settings: Settings, token: str | None, log: Log = print) -> Outcome:
    """Parse is done; build, run, close. The group is destroyed on every path out."""
    fed = settings.federation
    device = resolve_device(settings.train.device)
    backend = comm.pick_backend(fed.backend, device)
    address = comm.resolve_address(fed.aggregator)
    checkpoint.ensure_writable(settings.checkpoint.checkpoint_dir)
    fingerprint = settings_fingerprint(settings)
    # Read the checkpoint before listening: a corrupt one must stop us before any silo is admitted.
    resumed = checkpoint.load(settings.checkpoint.checkpoint_dir, fingerprint)
    tokenizer = load_tokenizer(settings.model.model)
    test, labels = aggregator_test_data(settings, tokenizer)
    if token is None:
        log("warning: no join token set (FEDSILO_TOKEN or --token-file): any process that reaches the port can join")

    # admit the silos: authenticate, then check they agree on settings, labels and model
    store = comm.open_store(0, address[0], address[1], fed.join_timeout)
    log(f"waiting for {fed.silos} silo(s) on {address[0]}:{address[1]} ({backend})")
    hellos, labels = _admit(settings, store, token, labels, log)
    try:
        model = build_model(settings.model.model, labels, settings.train.seed).to(device)
        arch = architecture_fingerprint(model)
        mismatched = [r for r, h in hellos.items() if h.architecture != arch]
        if mismatched:
            raise FederationError(f"silo(s) {mismatched} built a different model from the aggregator's "
                                  f"({settings.model.model})")
        if resumed is not None:
            checkpoint.check_fits(resumed, settings.checkpoint.checkpoint_dir, labels, flat_size(model))
        outbox = checkpoint.checkpoint_path(settings.checkpoint.checkpoint_dir, fingerprint).parent
        if resumed is not None and resumed.round >= fed.rounds:
            # That federation finished: deliver what MLflow missed of it, then start a new one. Its
            # undelivered results must not end up in the new federation's run: wait for MLflow.
            if not Tracker(settings, labels, resumed.run_id, outbox, log).finish():
                raise FederationError(
                    f"the last federation with these settings finished, but its results still wait in {outbox} "
                    f"for MLflow at {settings.tracking.tracking_uri}; start again once it is reachable")
            resumed = None
    except FedsiloError as exc:
        # The admitted silos are blocked on their verdict: give them the reason, not a hang-up.
        for hello in hellos.values():
            join.refuse(store, hello, str(exc))
        raise

    start = resumed.round + 1 if resumed else 1
    if resumed:
        load_flat(model, resumed.weights.to(device))
        log(f"resuming after round {resumed.round} from {checkpoint.checkpoint_path(settings.checkpoint.checkpoint_dir, fingerprint)}")
    # Reach MLflow before the group forms: the silos then wait in their first collective, under
    # the round timeout, and a slow tracking server (or a new sqlite store) must not use it up.
    reference = {} if test is None else {MAJORITY_PARAM: f"{majority_share(test):.6f}"}
    tracker = Tracker(settings, labels, resumed.run_id if resumed else None, outbox, log, params=reference)
    log(tracker.ui_hint())
    eval_on_silos = test is None
    for hello in hellos.values():
        join.welcome(store, hello, token, join.Welcome(labels, start, eval_on_silos))

    group: comm.Group | None = None
    try:
        group = comm.form_group(store, 0, fed.silos + 1, backend, device, fed.round_timeout, address)
        weights = bind_flat(model)  # the model's own storage: the global model is never copied
        if weights.device.type != group.device.type:  # gloo with a GPU model: the wire needs a CPU copy
            weights = weights.to(group.device)
        final = run_rounds(settings, group, model, weights, test, tracker, start, fingerprint, labels, log)
        tracker.log_model(model, tokenizer)
        tracker.finish()
        log(f"done: {tracker.ui_hint()}")
        return Outcome(tracker.run_id, final, weights.cpu())
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        if group is not None:
            group.close()


def run_rounds(
    settings: Settings,
    group: comm.Group,
    model: torch.nn.Module,
    weights: torch.Tensor,
    test: Encoded | None,
    tracker: Tracker,
    start: int,
    fingerprint: str,
    labels: list[str],
    log: Log,
) -> float:
    """The FedAvg round loop; ``weights`` is the global model, updated in place.

    ``weights`` is best the model's own flat vector (:func:`~fedsilo.model.bind_flat`): then the
    aggregator holds two model-sized buffers, it and the reduce's. Returns the test accuracy
    after the last round.
    """
    fed = settings.federation
    summed = torch.zeros(weights.numel(), dtype=getattr(torch, fed.transfer_dtype), device=weights.device)
    bound = is_bound(model, weights)
    accuracy = float("nan")
    bytes_per_silo = weights.numel() * (weights.element_size() + summed.element_size())
    with comm.collective_phase(group, f"round {start}: sending the global model"):
        group.broadcast_(weights)
    for round_ in range(start, fed.rounds + 1):
        started = time.perf_counter()
        # local training happens on the silos; each reports its example count, loss, update norm
        with comm.collective_phase(group, f"round {round_}: local training"):
            rows = group.gather_rows(torch.zeros(len(REPORT_FIELDS), dtype=torch.float64))
        reports = read_reports(rows)

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
        with comm.collective_phase(group, f"round {round_}: receiving updates"):
            group.reduce_sum_(summed)  # zero on entry: rank 0's own term of the sum
        total = sum(r.examples for r in reports if r.rank in accepted)
        finish_average(weights, summed, total)

        # send the new global model: silos start the next round from it (and evaluate it)
        with comm.collective_phase(group, f"round {round_}: sending the global model"):
            group.broadcast_(weights)
        comm_seconds = time.perf_counter() - comm_started
        summed.zero_()  # for the next round's reduce, while the silos train
        if not bound:
            load_flat(model, weights)

        # evaluate, here or on the silos' held-out data
        if test is not None:
            result = evaluate(model, test, batch_size=settings.train.eval_batch_size,
                              attention_mask=settings.model.attention_mask)
        else:
            with comm.collective_phase(group, f"round {round_}: evaluation on the silos"):
                rows = group.gather_rows(torch.zeros(len(EVAL_FIELDS), dtype=torch.float64))
            result = EvalResult(int(rows[1:, 0].sum()), float(rows[1:, 1].sum()), int(rows[1:, 2].sum()))
        accuracy = result.accuracy

        # log and checkpoint
        metrics = round_metrics(result, reports, accepted, skipped, time.perf_counter() - started)
        metrics.update(comm_seconds=comm_seconds, bytes_per_silo=float(bytes_per_silo))
        tracker.log_round(round_, metrics)
        checkpoint.save(settings.checkpoint.checkpoint_dir,
                        checkpoint.Checkpoint(round_, weights, tracker.run_id, labels, fingerprint))
        log(round_line(round_, fed.rounds, metrics))
    return accuracy
