"""fedsilo.model: the flat binding (the model's tensors as views of one vector) and the copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsilo.model import (
    bind_flat,
    build_model,
    draw_head,
    flat_size,
    float_tensors,
    head_modules,
    is_bound,
    load_flat,
    offset_in,
)
from tests.reference import flatten


class Tied(torch.nn.Module):
    """An embedding tied to the output layer, a transposed (non-contiguous) weight and a float buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.out = torch.nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight
        self.mix = torch.nn.Parameter(torch.randn(3, 4).t())
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids) * self.scale
        return self.out(hidden + (hidden @ self.mix).sum(-1, keepdim=True))


def sgd_steps(model: torch.nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        optimizer.step()


def test_binding_keeps_the_values_and_makes_every_tensor_a_view() -> None:
    # Prepare
    torch.manual_seed(0)
    model = Tied()
    before, ids = flatten(model), torch.tensor([[1, 5, 2]])
    expected = model(ids)
    assert not model.mix.is_contiguous()
    # Execute
    flat = bind_flat(model)
    # Assert: the same numbers, the same outputs, one vector underneath, still tied
    assert torch.equal(flat, before) and flat.numel() == flat_size(model) == 7 * 4 + 4 * 3 + 4
    assert torch.equal(model(ids), expected)
    assert is_bound(model, flat) and not is_bound(model, flat.clone())
    assert model.out.weight is model.embed.weight and model.mix.shape == (4, 3)
    assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in float_tensors(model))


def test_a_bound_tensor_is_found_at_its_offset_and_a_stranger_is_refused() -> None:
    model = Tied()
    flat = bind_flat(model)
    tensors = float_tensors(model)  # mix, scale, embed (tied with out): state-dict order
    sizes = [t.numel() for t in tensors]
    assert [offset_in(flat, t) for t in tensors] == [sum(sizes[:i]) for i in range(len(sizes))]
    start = offset_in(flat, model.embed.weight)
    assert torch.equal(flat[start : start + 28].view(7, 4), model.out.weight)
    with pytest.raises(ValueError, match="not a contiguous slice"):
        offset_in(flat, model.mix.clone())
    with pytest.raises(ValueError, match="not a contiguous slice"):
        offset_in(flat.clone(), model.mix)


def test_training_through_the_optimizer_writes_into_the_flat_vector() -> None:
    # Prepare: the same model twice, one bound
    torch.manual_seed(0)
    plain = Tied()
    bound = Tied()
    bound.load_state_dict(plain.state_dict())
    flat = bind_flat(bound)
    initial = flat.clone()
    # Execute
    sgd_steps(plain)
    sgd_steps(bound)
    # Assert: the vector moved with the parameters as unbound training did (to rounding: the
    # bound copy of ``mix`` is contiguous, so its matmul takes another kernel), and stayed bound
    assert torch.allclose(flat, flatten(plain), rtol=1e-6, atol=1e-6) and not torch.equal(flat, initial)
    assert is_bound(bound, flat) and bound.out.weight is bound.embed.weight


def test_writing_the_flat_vector_changes_the_model_and_copies_round_trip() -> None:
    # Prepare
    torch.manual_seed(0)
    model = Tied()
    flat = bind_flat(model)
    other = torch.randn(flat.numel())
    # Execute: in place, as a received global model arrives
    flat.copy_(other)
    # Assert: the model is the vector; flatten and load_flat round-trip exactly on a bound model
    assert torch.equal(flatten(model), other)
    load_flat(model, other * 2)
    assert torch.equal(flat, other * 2) and is_bound(model, flat)
    with pytest.raises(ValueError, match="flat vector has"):
        load_flat(model, torch.zeros(flat.numel() + 1))


def test_binding_refuses_tensors_that_are_not_float32() -> None:
    model = torch.nn.Linear(2, 2).to(torch.float64)
    with pytest.raises(ValueError, match="float32"):
        bind_flat(model)


def test_a_transformers_classifier_trains_in_its_flat_vector(tiny_bert: Path, sentiment_csv: Path) -> None:
    # Prepare: a real classifier (integer buffers such as position ids stay out of the vector)
    from fedsilo.data import encode
    from fedsilo.model import load_tokenizer
    from fedsilo.train import local_train

    tokenizer = load_tokenizer(str(tiny_bert))
    data = encode(
        ["a fine film", "a dull plot", "brilliant", "boring and bland"] * 4,
        torch.tensor([1, 0, 1, 0] * 4).numpy(),
        tokenizer,
        32,
    )
    plain, bound = (build_model(str(tiny_bert), ["neg", "pos"], 3) for _ in range(2))
    flat = bind_flat(bound)
    # Execute
    for model in (plain, bound):
        local_train(model, data, epochs=1, batch_size=4, lr=0.3, seed=(3, 1, 1))
    # Assert: bound training is unbound training, and the vector holds its result
    assert torch.equal(flat, flatten(plain)) and is_bound(bound, flat)


# -- per-client heads -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, head",
    [("bert", {"classifier"}), ("distilbert", {"pre_classifier", "classifier"})],
    ids=["bert", "distilbert"],
)
def test_a_drawn_head_is_the_clients_own_and_the_body_stays_shared(arch: str, head: set[str], tmp_path: Path) -> None:
    # Prepare: one model, as every client builds it (same seed), three times
    from tests.tiny import make_tiny_model

    path = str(make_tiny_model(tmp_path, arch))
    shared, first, second, again = (build_model(path, ["neg", "pos"], 3) for _ in range(4))
    # Execute: clients 1 and 2 draw their heads; client 1 once more
    draw_head(first, (3, 1))
    draw_head(second, (3, 2))
    draw_head(again, (3, 1))
    # Assert: the head is exactly the layers beside the pretrained body
    assert set(head_modules(shared)) == head | {"dropout"}
    states = [m.state_dict() for m in (shared, first, second, again)]
    for name, tensor in states[0].items():
        if name.split(".")[0] in head:
            assert not torch.equal(states[1][name], states[2][name]) or name.endswith("bias"), name
            assert not torch.equal(states[1][name], tensor) or name.endswith("bias"), name
            assert torch.equal(states[1][name], states[3][name]), name  # a seed draws one head
        else:
            assert all(torch.equal(s[name], tensor) for s in states[1:]), name  # the body: shared, untouched
    # drawn as transformers draws a new head: N(0, 0.02) weights, zero biases
    weight = (first.classifier.weight if arch == "bert" else first.pre_classifier.weight).detach()
    assert 0.01 < float(weight.std()) < 0.03 and abs(float(weight.mean())) < 0.01
    assert not first.classifier.bias.any()


def test_drawing_a_head_writes_into_a_bound_model(tiny_bert: Path) -> None:
    model = build_model(str(tiny_bert), ["neg", "pos"], 3)
    flat = bind_flat(model)
    before = flat.clone()
    draw_head(model, (3, 1))
    assert is_bound(model, flat)
    head = offset_in(flat, model.classifier.weight)
    assert not torch.equal(flat[head : head + 64], before[head : head + 64])
    assert torch.equal(flat[:head], before[:head])
