"""Record-level DP-SGD in each silo, with a budget that holds over the whole federation.

Each step samples every example of the silo independently with probability q = B / n (Poisson
sampling: the batches the standard DP-SGD analysis assumes), clips each example's gradient to L2
norm C, adds N(0, sigma^2 C^2) to the sum and divides by the expected batch size q n (Abadi et al.
2016). The clipped sum takes one forward and one backward pass per batch (:mod:`fedsilo.clipping`:
each layer's per-example norms from its inputs and output gradients, by Opacus's rules where a layer
is not a linear or embedding one).

The privacy loss is a pure function of (sigma, q, steps, delta): the steps per round are fixed by n,
B and the local epochs, so every rank (the silo, the aggregator, ``simulate``) computes the same
epsilon for silo k after r rounds, and a resumed federation the same as an uninterrupted one. The
accountant is Opacus's (RDP, or PRV); its RDP equals Google's ``dp-accounting`` (tests/test_dp.py).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsilo.clipping import ClippedSum
from fedsilo.config import PrivacyConfig
from fedsilo.data import Encoded, collate
from fedsilo.errors import ConfigError
from fedsilo.last_layer import cls_only_last_layer
from fedsilo.model import unwrapped
from fedsilo.train import TrainResult

# Renyi orders searched for the tightest bound: dp-accounting's defaults, which reach past Opacus's
# (up to 63): with few steps and a large epsilon the best order is high.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


@dataclass(frozen=True)
class Plan:
    """One silo's DP-SGD: what it adds each step and what each round costs."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int
    delta: float
    accountant: str
    budget: float | None

    def epsilon(self, rounds: int) -> float:
        """epsilon after ``rounds`` rounds of training (0 before any)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        from opacus.accountants import PRVAccountant, RDPAccountant  # 1.2 s: only when DP is on

        history = [(self.noise_multiplier, self.sample_rate, rounds * self.steps_per_round)]
        if self.accountant == "rdp":
            rdp = RDPAccountant()
            rdp.history = history
            return float(rdp.get_epsilon(self.delta, alphas=RDP_ORDERS))
        prv = PRVAccountant()
        prv.history = history
        return float(prv.get_epsilon(self.delta))

    def allows(self, rounds: int) -> bool:
        """Whether ``rounds`` rounds stay within the budget (a hair of slack: calibration lands on it)."""
        return self.budget is None or self.epsilon(rounds) <= self.budget * (1 + 1e-6)

    def rounds_allowed(self, rounds: int) -> int:
        """The most rounds, up to ``rounds``, within the budget (epsilon grows with every round)."""
        low, high = 0, rounds  # allows(low) holds; find the last r that does
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.allows(middle) else (low, middle - 1)
        return low


def sitting_out(plans: Mapping[int, Plan], rounds: int) -> tuple[dict[int, int], int, str | None]:
    """Under --dp-on-exhausted skip: each silo's last round within its budget, the round the
    federation ends after (when the last budget is spent), and the line naming the silos that sit
    out the rounds they cannot afford."""
    allowed = {rank: silo.rounds_allowed(rounds) for rank, silo in sorted(plans.items())}
    short = [
        f"silo {rank}'s privacy budget (epsilon {plans[rank].budget:g}) allows {n} of {rounds} rounds: "
        f"it sits out from round {n + 1}"
        for rank, n in allowed.items()
        if n < rounds
    ]
    end = max(allowed.values(), default=rounds)
    if end == 0:
        raise ConfigError(f"{'; '.join(short)}; raise --dp-epsilon or --dp-noise-multiplier")
    return allowed, end, "; ".join(short) or None


def last_round(plans: Mapping[int, Plan], rounds: int) -> tuple[int, str | None]:
    """The round a federation of these silos ends after, and the line that names the silo whose budget
    ends it early. Every rank computes it alike, from the silos' sizes and the agreed settings, so
    the federation stops before any silo passes its epsilon without a message for it."""
    end, why = rounds, None
    for rank, silo in sorted(plans.items()):
        allowed = silo.rounds_allowed(end)
        if allowed < end:
            end = allowed
            why = (
                f"silo {rank}'s privacy budget (epsilon {silo.budget:g}) allows {allowed} of {rounds} rounds: "
                f"round {allowed + 1} would take it to epsilon {silo.epsilon(allowed + 1):.3g}"
            )
    if end == 0:
        raise ConfigError(f"{why}; raise --dp-epsilon or --dp-noise-multiplier")
    return end, why


def plan(privacy: PrivacyConfig, examples: int, batch_size: int, epochs: int, rounds: int) -> Plan:
    """A silo's plan from the settings and its own data size; calibrates sigma when only epsilon is given,
    so that the last planned round ends at the budget."""
    if privacy.dp_delta >= 1 / examples:
        raise ConfigError(
            f"--dp-delta {privacy.dp_delta:g} must be below 1/n = {1 / examples:.3g} for a silo of {examples} "
            "examples (else one example's leak is not unlikely)"
        )
    sample_rate = min(1.0, batch_size / examples)
    steps = epochs * max(1, round(examples / batch_size))
    sigma = privacy.dp_noise_multiplier
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        assert privacy.dp_epsilon is not None
        sigma = get_noise_multiplier(
            target_epsilon=privacy.dp_epsilon,
            target_delta=privacy.dp_delta,
            sample_rate=sample_rate,
            steps=rounds * steps,
            accountant=privacy.dp_accountant,
            epsilon_tolerance=0.001,
            **({"alphas": RDP_ORDERS} if privacy.dp_accountant == "rdp" else {}),
        )
    return Plan(
        sigma, privacy.dp_max_grad_norm, sample_rate, steps, privacy.dp_delta, privacy.dp_accountant, privacy.dp_epsilon
    )


def _per_example_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Position (and token type) ids with a row per example. Left to the model, BERT's come from a
    (1, L) buffer broadcast over the batch, whose gradient is the batch's where DP needs one per
    example. Token types only where the model has a table of them: GPT-2 accepts ``token_type_ids``
    but looks them up in its word embeddings, so zeros would add a token to every position."""
    inner = unwrapped(model)
    accepted = inspect.signature(inner.forward).parameters
    rows, width = input_ids.shape
    ids = {}
    if "position_ids" in accepted:
        ids["position_ids"] = torch.arange(width, device=input_ids.device).repeat(rows, 1)
    if "token_type_ids" in accepted and getattr(getattr(inner, "config", None), "type_vocab_size", None):
        ids["token_type_ids"] = torch.zeros_like(input_ids)
    return ids


def private_train(
    model: torch.nn.Module,
    data: Encoded,
    plan: Plan,
    *,
    seed: Sequence[int],
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    attention_mask: bool = True,
    fast_paths: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """One round of DP-SGD on ``data``: ``plan.steps_per_round`` Poisson-sampled steps. The parameters
    are stepped in place (a flat binding stays valid). Sparse embedding gradients are off (noise makes
    every row's gradient dense); the [CLS]-only last layer stays on with ``fast_paths`` (each example's
    gradient through it is the full layer's)."""
    device = next(model.parameters()).device
    generator = np.random.default_rng(np.random.SeedSequence([*seed, 7]))
    torch.manual_seed(int(generator.integers(2**62)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    expected = plan.sample_rate * len(data)
    clipped_sum = ClippedSum(model)
    model.train()
    started = time.perf_counter()
    loss_sum, seen = 0.0, 0
    try:
        with cls_only_last_layer(model) if fast_paths else contextlib.nullcontext():
            for step in range(plan.steps_per_round):
                rows = np.flatnonzero(generator.random(len(data)) < plan.sample_rate)
                if len(rows):
                    batch = {k: v.to(device) for k, v in collate(data, rows, attention_mask).items()}
                    labels = batch.pop("labels")
                    batch.update(_per_example_ids(model, batch["input_ids"]))
                    logits = model(**batch).logits
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                    # each example's gradient clipped to C, summed over the batch
                    summed = clipped_sum(loss, len(rows), plan.max_grad_norm)
                    loss_sum += float(loss.detach())
                    seen += len(rows)
                else:  # an empty Poisson batch is a step of noise alone
                    summed = [torch.zeros_like(p) for p in params]
                # noise, and the average over the expected batch size (not the drawn one: that would leak it)
                for total, p in zip(summed, params, strict=True):
                    if plan.noise_multiplier > 0:
                        total.add_(torch.randn_like(total), alpha=plan.noise_multiplier * plan.max_grad_norm)
                    p.grad = total.div_(expected)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if progress is not None:
                    progress(step + 1, plan.steps_per_round, loss_sum / max(seen, 1))
    finally:
        clipped_sum.close()  # removes the hooks: the model is the plain model again
    return TrainResult(len(data), loss_sum / max(seen, 1), time.perf_counter() - started, plan.steps_per_round, ())
