"""Ranks 1..K: train on local data, send the weighted update, evaluate when asked.

Only model tensors and a few scalars leave this process; the rows never do.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedsilo import comm, join, secagg, transport
from fedsilo.averaging import Report, UpdateRejected, validate_updates
from fedsilo.client import plan_of, rounds_allowed, train_round
from fedsilo.config import Settings, agreed_settings
from fedsilo.errors import ConfigError
from fedsilo.model import architecture_fingerprint, bind_flat, build_classifier, load_tokenizer
from fedsilo.progress import Log, batch_progress
from fedsilo.train import evaluate, resolve_device
from fedsilo.workload import SiloData, silo_data


def check_rank(rank: int, silos: int) -> None:
    if not 1 <= rank <= silos:
        raise ConfigError(
            f"rank {rank} is outside 1..{silos} (the federation has {silos} silo(s); rank 0 is the aggregator)"
        )


def serve(settings: Settings, rank: int, token: str | None, log: Log = print) -> None:
    """Parse is done; build, run, close. The group is destroyed on every path out."""
    fed = settings.federation
    check_rank(rank, fed.silos)
    transport.check(settings)
    device = resolve_device(settings.train.device)
    address = comm.resolve_address(fed.aggregator)
    tokenizer = load_tokenizer(settings.model.model)
    data = silo_data(settings, rank, tokenizer)
    model = build_classifier(settings, data.labels, tokenizer).to(device)
    if settings.privacy.enabled:  # the plan's checks, before joining; the sigma it calibrates
        plan = plan_of(settings, len(data.train))
        log(f"silo {rank}: DP-SGD with noise multiplier {plan.noise_multiplier:.4g}, clipping {plan.max_grad_norm:g}")
    log(f"silo {rank}: {len(data.train)} training examples; joining {address[0]}:{address[1]}")

    link = transport.dial(settings, rank, token, device)
    welcome = link.request_admission(
        {
            "settings": agreed_settings(settings),
            "labels": data.labels,
            "architecture": architecture_fingerprint(model),
            "train_examples": len(data.train),
            "eval_examples": len(data.eval) if data.eval is not None else 0,
        },
        fed.join_timeout,
    )
    if welcome.eval_on_silos and data.eval is None:
        raise ConfigError(f"silo {rank} has no held-out data to evaluate on")
    group = link.form_group(fed.silos + 1, fed.round_timeout)
    try:
        secrets = secagg.exchange(group, rank, token, secagg.identity_of(settings)) if fed.secure_aggregation else None
        run_rounds(settings, group, model, data, rank, welcome, log, secrets)
    finally:
        group.close()


def run_rounds(
    settings: Settings,
    group: comm.Transport,
    model: torch.nn.Module,
    data: SiloData,
    rank: int,
    welcome: join.Welcome,
    log: Log,
    secrets: dict[int, bytes] | None = None,
) -> None:
    """A silo's side of each round, in the same order as the aggregator's loop. With ``secrets``
    (secure aggregation: this silo's pair secrets) the update travels masked."""
    fed, train = settings.federation, settings.train
    local = bind_flat(model)  # the model's own storage: it trains in it, and the update is formed in it
    weights = torch.empty(local.numel(), dtype=torch.float32, device=group.device)
    # gloo with a GPU model: the wire's buffers live on the CPU, apart from the model's
    update = local if local.device.type == group.device.type else torch.empty_like(weights)
    wire_dtype = getattr(torch, fed.transfer_dtype)
    n = len(data.train)
    last_own = rounds_allowed(settings, n)  # under --dp-on-exhausted skip, its budget's last round
    sealer = secagg.Sealer(rank, secrets) if secrets is not None else None
    with group.phase(f"round {welcome.start_round}: receiving the global model"):
        group.broadcast_(weights)
    for round_ in range(welcome.start_round, welcome.last_round + 1):
        # start from the global model and train locally (its own head in round 1 under
        # per-client head init; DP-SGD under the privacy settings), unless its budget is spent
        local.copy_(weights)
        if round_ > last_own:
            log(f"round {round_}: sitting out, the privacy budget is spent")
            report = Report(rank, n, 0.0, 0.0, sits_out=1)
        else:
            if sealer is not None:  # secure aggregation: the masks are drawn while it trains
                sealer.draw(round_, local.numel())
            result = train_round(
                settings, model, data.train, rank, round_, batch_progress(log, f"round {round_}:", last_batch=True)
            )
            report = Report(rank, n, result.mean_loss, 0.0, result.seconds, result.steps)

        # report, then send n * (theta_local - theta_global) if it passes validation; the
        # scaling comes before the report, outside the aggregator's clocked window
        if update is not local:
            update.copy_(local)
        norm = float(update.sub_(weights).norm())
        update.mul_(n)
        with group.phase(f"round {round_}: reporting"):
            reports = Report.from_rows(group.gather_rows(replace(report, update_norm=norm).to_row()))
        # Every rank holds every report: judge them as the aggregator does (the same pure check on
        # the same rows and agreed settings), so no verdict has to cross the wire before the reduce.
        try:
            accepted, _ = validate_updates(reports, round_, fed.norm_factor, fed.update_policy)
        except UpdateRejected:
            accepted = []  # the aggregator stops the federation: the next collective fails and reads why
        if rank not in accepted:
            update.zero_()  # not mul_(0): a rejected non-finite update would still be NaN
        wire = update if wire_dtype == update.dtype else update.to(wire_dtype)
        if sealer is not None:
            wire = sealer.seal(wire, reports, accepted, round_)
        with group.phase(f"round {round_}: sending the update"):
            group.reduce_sum_(wire)

        # receive the new global model; evaluate it on held-out rows if the aggregator has none
        with group.phase(f"round {round_}: receiving the global model"):
            group.broadcast_(weights)
        if welcome.eval_on_silos:
            assert data.eval is not None
            local.copy_(weights)
            scores = evaluate(
                model,
                data.eval,
                batch_size=train.eval_batch_size,
                attention_mask=settings.model.attention_mask,
                fast_paths=train.fast_paths,
            )
            with group.phase(f"round {round_}: reporting evaluation"):
                group.gather_rows(scores.to_row())
