"""One client's local round, the same for silo k and ``simulate``'s client k: its own head in round 1
when asked, then local training, or DP-SGD when the privacy settings ask for it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

import torch

from fedsilo import dp
from fedsilo.config import PrivacyConfig, Settings
from fedsilo.data import Encoded
from fedsilo.errors import ConfigError
from fedsilo.model import draw_head
from fedsilo.train import Schedule, TrainResult, local_train, make_optimizer


@cache
def privacy_plan(privacy: PrivacyConfig, examples: int, batch_size: int, epochs: int, rounds: int) -> dp.Plan:
    """:func:`dp.plan`, once per silo: calibrating sigma searches the accountant."""
    return dp.plan(privacy, examples, batch_size, epochs, rounds)


def plan_of(settings: Settings, examples: int) -> dp.Plan:
    """The DP-SGD plan of a silo with ``examples`` training rows under ``settings`` (privacy enabled);
    what DP-SGD does not do yet is refused here, at start-up."""
    train = settings.train
    if train.fedprox_mu > 0 or train.lr_schedule != "constant" or train.gradient_checkpointing:
        # gradient checkpointing reruns layers in the backward pass, where the clipping reads each
        # layer's inputs from the forward pass (fedsilo/clipping.py)
        raise ConfigError(
            "DP-SGD (--dp-epsilon, --dp-noise-multiplier) runs with a constant --lr, no --fedprox-mu and no "
            "--gradient-checkpointing"
        )
    return privacy_plan(settings.privacy, examples, train.batch_size, train.local_epochs, settings.federation.rounds)


def rounds_allowed(settings: Settings, examples: int) -> int:
    """The last round a silo with ``examples`` rows trains in: under --dp-on-exhausted skip the last
    its budget affords (it sits out the rest), else every round (stop ends the federation instead)."""
    rounds = settings.federation.rounds
    if settings.privacy.dp_on_exhausted != "skip":
        return rounds
    return plan_of(settings, examples).rounds_allowed(rounds)


@dataclass(frozen=True)
class Budget:
    """The silos' privacy plans, as the aggregator and ``simulate`` see them, and the round the
    federation ends after (``why``: the line naming the silo whose budget ends it early, or under
    --dp-on-exhausted skip the silos that sit out; ``allowed``: each silo's last round, where it is
    earlier than the federation's)."""

    plans: dict[int, dp.Plan]
    last_round: int
    why: str | None
    allowed: dict[int, int] = field(default_factory=dict)

    def sits_out(self, rank: int, round_: int) -> bool:
        return round_ > self.allowed.get(rank, self.last_round)

    def params(self) -> dict[str, str]:
        """Each silo's sigma and sampling rate (delta, C and the accountant are settings, logged already)."""
        found = {}
        for rank, plan in self.plans.items():
            found[f"silo/{rank}/dp_noise_multiplier"] = f"{plan.noise_multiplier:.6g}"
            found[f"silo/{rank}/dp_sample_rate"] = f"{plan.sample_rate:.6g}"
        return found

    def metrics(self, round_: int) -> dict[str, float]:
        """Each silo's epsilon after ``round_`` rounds, and the largest."""
        spent = {
            f"silo/{rank}/dp_epsilon": plan.epsilon(min(round_, self.allowed.get(rank, round_)))
            for rank, plan in self.plans.items()
        }
        return {**spent, "dp_epsilon_max": max(spent.values())} if spent else {}


def budget(settings: Settings, examples: Mapping[int, int]) -> Budget:
    """The federation's budget from each silo's training rows (``examples``: rank -> n)."""
    rounds = settings.federation.rounds
    if not settings.privacy.enabled:
        return Budget({}, rounds, None)
    plans = {rank: plan_of(settings, n) for rank, n in examples.items()}
    if settings.privacy.dp_on_exhausted == "skip":
        allowed, last, why = dp.sitting_out(plans, rounds)
        return Budget(plans, last, why, allowed)
    last, why = dp.last_round(plans, rounds)
    return Budget(plans, last, why)


def train_round(
    settings: Settings,
    model: torch.nn.Module,
    data: Encoded,
    client: int,
    round_: int,
    progress: Callable[[int, int, float], None],
) -> TrainResult:
    """Client ``client``'s training in round ``round_``, from the global model already in ``model``."""
    train = settings.train
    if round_ == 1 and train.head_init == "per-client":
        draw_head(model, (train.seed, client))
    seed = (train.seed, client, round_)
    if settings.privacy.enabled:
        return dp.private_train(
            model,
            data,
            plan_of(settings, len(data)),
            seed=seed,
            make_optimizer=lambda params: make_optimizer(params, train.optimizer, train.lr, train.weight_decay),
            attention_mask=settings.model.attention_mask,
            fast_paths=train.fast_paths,
            progress=progress,
        )
    return local_train(
        model,
        data,
        epochs=train.local_epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        seed=seed,
        optimizer=train.optimizer,
        weight_decay=train.weight_decay,
        schedule=Schedule(train.lr_schedule, train.warmup_ratio, parts=settings.federation.rounds, part=round_ - 1),
        fedprox_mu=train.fedprox_mu,
        attention_mask=settings.model.attention_mask,
        group_by_length=train.group_by_length,
        fast_paths=train.fast_paths,
        progress=progress,
    )
