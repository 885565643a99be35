"""Server optimisers: how the aggregator applies the round's averaged update to the global model.

The averaged update ``delta = sum_k n_k (x_k - x) / sum_k n_k`` is the pseudo-gradient of Reddi
et al., *Adaptive Federated Optimization* (ICLR 2021), Algorithm 2, taken as a step to ascend:

- fedavg: ``x += lr * delta`` (with lr 1, Federated Averaging itself, bit for bit);
- fedavgm: ``m = momentum * m + delta; x += lr * m`` (server momentum, Hsu et al. 2019, as Flower's
  FedAvgM);
- fedadam, fedyogi, fedadagrad: ``m = b1 * m + (1 - b1) * delta``, then per variant
  ``v = v + delta^2`` (Adagrad), ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)`` (Yogi) or
  ``v = b2 * v + (1 - b2) * delta^2`` (Adam), and ``x += lr * m / (sqrt(v) + tau)``, with ``m``
  starting at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``) and, as in the paper, no
  bias correction.

The steps are functions of flat tensors, in place; :class:`ServerOptimizer` holds the state
(``m``, ``v``) between rounds, which the checkpoint keeps so that a resumed federation continues
exactly. FedAvg keeps none, and allocates nothing beyond the aggregator's two model-sized buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsilo.averaging import finish_average
from fedsilo.config import ServerConfig


def averaged_update(summed: torch.Tensor, total_examples: int, dtype: torch.dtype) -> torch.Tensor:
    """``summed / total_examples`` in ``dtype``: the round's pseudo-gradient, a new tensor."""
    if total_examples <= 0:
        raise ValueError("no examples were contributed this round")
    return summed.to(dtype, copy=True).mul_(1.0 / total_examples)


def momentum_step(weights: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, *, lr: float, momentum: float) -> None:
    """FedAvgM: ``m = momentum * m + delta; weights += lr * m``, in place."""
    m.mul_(momentum).add_(delta)
    weights.add_(m, alpha=lr)


def adaptive_step(
    weights: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    variant: str,
    lr: float,
    betas: tuple[float, float],
    tau: float,
) -> None:
    """FedAdam, FedYogi or FedAdagrad (``variant``), in place on ``weights``, ``m`` and ``v``;
    ``delta`` is used up as scratch space."""
    beta1, beta2 = betas
    m.mul_(beta1).add_(delta, alpha=1 - beta1)
    square = delta.square_()
    if variant == "fedadagrad":
        v.add_(square)
    elif variant == "fedyogi":
        # Yogi moves v towards delta^2 by a bounded amount: it cannot grow as fast as Adam's v
        v.addcmul_(square, torch.sign(v - square), value=-(1 - beta2))
    elif variant == "fedadam":
        v.mul_(beta2).add_(square, alpha=1 - beta2)
    else:
        raise ValueError(f"unknown adaptive server optimiser {variant!r}")
    denominator = torch.sqrt(v, out=square).add_(tau)
    weights.addcdiv_(m, denominator, value=lr)


# What each server optimiser keeps from round to round: model-sized vectors, by name.
STATE: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("m",),
    "fedadam": ("m", "v"),
    "fedyogi": ("m", "v"),
    "fedadagrad": ("m", "v"),
}


class ServerOptimizer:
    """One federation's server optimiser and its state, over flat vectors like ``like``."""

    def __init__(
        self, config: ServerConfig, like: torch.Tensor, state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """``state``: a resumed federation's (:meth:`state_dict`); a new one starts from zero."""
        self.config = config
        name = config.server_optimizer
        self.state = {key: torch.zeros_like(like) for key in STATE[name]}
        if "v" in self.state:
            self.state["v"].fill_(config.server_tau**2)
        if state:
            if set(state) != set(self.state):
                raise ValueError(f"{name} keeps state {sorted(self.state)}, the checkpoint holds {sorted(state)}")
            for key, value in state.items():
                self.state[key].copy_(value)

    def step(self, weights: torch.Tensor, summed: torch.Tensor, total_examples: int) -> torch.Tensor:
        """The new global model from ``summed`` (``sum_k n_k (x_k - x)``), in place on ``weights``."""
        config, name = self.config, self.config.server_optimizer
        if name == "fedavg":
            return finish_average(weights, summed, total_examples, scale=config.step_size)
        delta = averaged_update(summed, total_examples, weights.dtype)
        if name == "fedavgm":
            momentum_step(weights, delta, self.state["m"], lr=config.step_size, momentum=config.server_momentum)
        else:
            adaptive_step(
                weights,
                delta,
                self.state["m"],
                self.state["v"],
                variant=name,
                lr=config.step_size,
                betas=config.server_betas,
                tau=config.server_tau,
            )
        return weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the checkpoint keeps: ``m`` (fedavgm and the adaptive ones) and ``v`` (adaptive)."""
        return dict(self.state)
