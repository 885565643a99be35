"""fedsilo.server_opt: each server optimiser against two rounds worked by hand from Reddi et al.
2021, Algorithm 2 (and FedAvgM's momentum), and FedAvg with server lr 1 bit for bit."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedsilo.config import ServerConfig
from fedsilo.server_opt import ServerOptimizer

# Two weights, two rounds. Each round's averaged update delta = summed / total: summed holds
# sum_k n_k (x_k - x) for total = 4 examples, so delta is a quarter of it.
X0 = [1.0, -2.0]
DELTAS = [[0.5, -1.0], [0.25, 2.0]]
TOTAL = 4


def run_two_rounds(**config: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The global model after round 1 then after round 2, one list, and the final state, in float64."""
    server = ServerOptimizer(ServerConfig(**config), torch.zeros(2, dtype=torch.float64))
    weights = torch.tensor(X0, dtype=torch.float64)
    after: list[float] = []
    for delta in DELTAS:
        summed = torch.tensor(delta, dtype=torch.float64) * TOTAL
        server.step(weights, summed, TOTAL)
        after.extend(weights.tolist())
    return after, server.state_dict()


def test_fedavg_with_server_lr_1_is_federated_averaging_bit_for_bit() -> None:
    # Prepare: awkward float32 values, where any other order of operations would round otherwise
    torch.manual_seed(0)
    weights, summed = torch.randn(1000), torch.randn(1000) * 37
    expected = weights.clone().add_(summed, alpha=1.0 / 37)  # FedAvg's step as finish_average always took it
    # Execute
    for config in ({}, {"server_optimizer": "fedavg", "server_lr": 1.0}):
        server = ServerOptimizer(ServerConfig(**config), weights)
        got = server.step(weights.clone(), summed, 37)
        # Assert: the same bits, and no state to keep
        assert torch.equal(got, expected)
        assert server.state_dict() == {}


def test_fedavg_with_a_server_lr_scales_the_average() -> None:
    after, _ = run_two_rounds(server_lr=0.5)
    # x1 = x0 + 0.5 delta1 = [1.25, -2.5]; x2 = x1 + 0.5 delta2 = [1.375, -1.5]
    assert after == pytest.approx([1.25, -2.5, 1.375, -1.5])


def test_fedavgm() -> None:
    after, state = run_two_rounds(server_optimizer="fedavgm", server_lr=0.5, server_momentum=0.5)
    # round 1: m = 0.5 * 0 + [0.5, -1] = [0.5, -1];            x = [1, -2] + 0.5 m = [1.25, -2.5]
    # round 2: m = 0.5 * [0.5, -1] + [0.25, 2] = [0.5, 1.5];    x = [1.25, -2.5] + 0.5 m = [1.5, -1.75]
    assert after == pytest.approx([1.25, -2.5, 1.5, -1.75])
    assert state["m"].tolist() == pytest.approx([0.5, 1.5])


ADAPTIVE = {"server_lr": 0.1, "server_betas": (0.5, 0.75), "server_tau": 0.5}


def test_fedadam() -> None:
    after, state = run_two_rounds(server_optimizer="fedadam", **ADAPTIVE)
    # v starts at tau^2 = 0.25, m at 0
    # round 1: m = 0.5 delta1 = [0.25, -0.5]
    #          v = 0.75 * 0.25 + 0.25 delta1^2 = [0.1875 + 0.0625, 0.1875 + 0.25] = [0.25, 0.4375]
    #          x = x0 + 0.1 m / (sqrt(v) + 0.5)
    x1 = [1 + 0.1 * 0.25 / (0.5 + 0.5), -2 + 0.1 * -0.5 / (math.sqrt(0.4375) + 0.5)]
    # round 2: m = 0.5 m + 0.5 delta2 = [0.125 + 0.125, -0.25 + 1] = [0.25, 0.75]
    #          v = 0.75 v + 0.25 delta2^2 = [0.1875 + 0.015625, 0.328125 + 1] = [0.203125, 1.328125]
    x2 = [x1[0] + 0.1 * 0.25 / (math.sqrt(0.203125) + 0.5), x1[1] + 0.1 * 0.75 / (math.sqrt(1.328125) + 0.5)]
    assert after == pytest.approx([*x1, *x2], rel=1e-12)
    assert state["m"].tolist() == pytest.approx([0.25, 0.75])
    assert state["v"].tolist() == pytest.approx([0.203125, 1.328125])


def test_fedyogi() -> None:
    after, state = run_two_rounds(server_optimizer="fedyogi", **ADAPTIVE)
    # v = v - 0.25 delta^2 sign(v - delta^2), from v = 0.25
    # round 1: delta1^2 = [0.25, 1]: sign(v - delta^2) = [0, -1], so v = [0.25, 0.25 + 0.25] = [0.25, 0.5]
    #          m = [0.25, -0.5] as FedAdam's
    x1 = [1 + 0.1 * 0.25 / (0.5 + 0.5), -2 + 0.1 * -0.5 / (math.sqrt(0.5) + 0.5)]
    # round 2: delta2^2 = [0.0625, 4]: sign = [+1, -1], so v = [0.25 - 0.015625, 0.5 + 1] = [0.234375, 1.5]
    #          m = [0.25, 0.75]
    x2 = [x1[0] + 0.1 * 0.25 / (math.sqrt(0.234375) + 0.5), x1[1] + 0.1 * 0.75 / (math.sqrt(1.5) + 0.5)]
    assert after == pytest.approx([*x1, *x2], rel=1e-12)
    assert state["v"].tolist() == pytest.approx([0.234375, 1.5])


def test_fedadagrad() -> None:
    after, state = run_two_rounds(server_optimizer="fedadagrad", **ADAPTIVE)
    # v = v + delta^2, from 0.25: round 1 [0.5, 1.25], round 2 [0.5625, 5.25]; m as FedAdam's
    x1 = [1 + 0.1 * 0.25 / (math.sqrt(0.5) + 0.5), -2 + 0.1 * -0.5 / (math.sqrt(1.25) + 0.5)]
    x2 = [x1[0] + 0.1 * 0.25 / (math.sqrt(0.5625) + 0.5), x1[1] + 0.1 * 0.75 / (math.sqrt(5.25) + 0.5)]
    assert after == pytest.approx([*x1, *x2], rel=1e-12)
    assert state["v"].tolist() == pytest.approx([0.5625, 5.25])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_resumed_optimiser_continues_as_if_never_stopped(name: str) -> None:
    # Prepare: the first round, then a new optimiser from its state (a resumed federation)
    config = ServerConfig(server_optimizer=name, server_lr=0.1)
    whole = ServerOptimizer(config, torch.zeros(2, dtype=torch.float64))
    weights = torch.tensor(X0, dtype=torch.float64)
    whole.step(weights, torch.tensor(DELTAS[0], dtype=torch.float64) * TOTAL, TOTAL)
    resumed = ServerOptimizer(config, torch.zeros(2, dtype=torch.float64), whole.state_dict())
    fresh = ServerOptimizer(config, torch.zeros(2, dtype=torch.float64))
    # Execute: round 2 three ways
    second = torch.tensor(DELTAS[1], dtype=torch.float64) * TOTAL
    got = [opt.step(weights.clone(), second, TOTAL) for opt in (whole, resumed, fresh)]
    # Assert: resumed equals uninterrupted; forgetting the state would not
    assert torch.equal(got[0], got[1])
    assert not torch.allclose(got[0], got[2])


def test_state_of_another_optimiser_is_refused() -> None:
    adam = ServerOptimizer(ServerConfig(server_optimizer="fedadam", server_lr=0.1), torch.zeros(2))
    with pytest.raises(ValueError, match=r"fedavgm keeps state \['m'\], the checkpoint holds \['m', 'v'\]"):
        ServerOptimizer(ServerConfig(server_optimizer="fedavgm"), torch.zeros(2), adam.state_dict())
