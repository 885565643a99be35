"""Each example's gradient clipped to norm C and summed over the batch, in one backward pass.

DP-SGD needs ``sum_i min(1, C / ||g_i||) g_i``, with ``g_i`` example i's gradient over every trainable
weight. Materialising every ``g_i`` (Opacus's ``GradSampleModule``) costs a model-sized tensor per
example: MiniLM's word embeddings alone are 1.5 GB for 32 examples. Opacus's ghost clipping avoids
that with norms computed from each layer's inputs and output gradients, and then a second backward
pass of the loss reweighted by the clipping factors. The second pass is not needed (the book-keeping
trick, Bu et al., ICML 2023): the one backward pass here computes the gradients of the layers' outputs
only, never the weights' own; each layer keeps its input X and output gradient G; once every example's
norm is known, a linear layer's clipped sum is one product ``(c G)^T X``, the weight gradient the
backward pass skipped.

Per layer, from X and G:

- ``Linear``: ``||g_i||^2 = <G_i G_i^T, X_i X_i^T>`` (the ghost norm: T^2 (d_in + d_out) per example
  for T positions), or from the per-example gradient ``G_i^T X_i`` where that is cheaper (T d_in d_out:
  a LoRA adapter's narrow matrices, a short sequence);
- ``Embedding``: an example's gradient is the rows of its distinct tokens, each the sum of G over that
  token's positions; padding positions (``padding_idx``) get none, as in PyTorch;
- anything else (layer and RMS norms, GPT-2's ``Conv1D``): the per-example gradients from Opacus's rule
  for the type, or its ``torch.func`` one; these layers are small.

A module called more than once in a forward (ALBERT's shared layers) is one layer: its calls'
positions are concatenated, so the per-example gradient is the sum over every call, as it must be.

Every trainable weight is seen through the forward of the module that holds it. A weight that some
other module reads directly (a language-model head tied to the word embeddings) would be missed;
the sequence classifiers fedsilo builds have none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

Tensor = torch.Tensor


class _Layer(Protocol):
    squares: Tensor  # (rows,): each example's squared gradient norm over this layer's weights

    def clipped(self, factor: Tensor) -> Iterator[tuple[Tensor, Tensor]]: ...


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _per_row(tensor: Tensor, rows: int, module: torch.nn.Module) -> Tensor:
    """``tensor``, checked to have a row per example: a batch dimension of another size is a broadcast
    input (one tensor for the whole batch), whose gradient is the batch's, not an example's."""
    if tensor.shape[0] != rows:
        raise RuntimeError(
            f"{type(module).__name__} saw a tensor of shape {tuple(tensor.shape)} in a batch of {rows}: "
            "per-example gradients need every input to have a row per example"
        )
    return tensor


def _by_example(tensor: Tensor, rows: int, module: torch.nn.Module) -> Tensor:
    """``tensor`` as (rows, positions, features)."""
    return _per_row(tensor, rows, module).reshape(rows, -1, tensor.shape[-1] if tensor.dim() > 1 else 1)


class _Linear:
    def __init__(self, module: torch.nn.Linear, calls: list[tuple[Tensor, Tensor]], rows: int) -> None:
        self.weight = module.weight if module.weight.requires_grad else None
        self.bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        self.x = torch.cat([_by_example(x, rows, module) for x, _ in calls], 1).float()
        self.g = torch.cat([_by_example(g, rows, module) for _, g in calls], 1).float()
        self.squares = torch.zeros(rows, device=self.g.device)
        self.per_example: Tensor | None = None
        if self.weight is not None:
            positions, d_in, d_out = self.x.shape[1], self.x.shape[2], self.g.shape[2]
            if positions * (d_in + d_out) < d_in * d_out:
                self.squares += ((self.g @ self.g.mT) * (self.x @ self.x.mT)).sum((1, 2))
            else:
                self.per_example = self.g.mT @ self.x
                self.squares += self.per_example.square().sum((1, 2))
        if self.bias is not None:
            self.bias_rows = self.g.sum(1)
            self.squares += self.bias_rows.square().sum(1)

    def clipped(self, factor: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        if self.weight is not None:
            if self.per_example is not None:
                yield self.weight, torch.einsum("n,noi->oi", factor, self.per_example)
            else:
                scaled = (self.g * factor[:, None, None]).flatten(0, 1)
                yield self.weight, scaled.mT @ self.x.flatten(0, 1)
        if self.bias is not None:
            yield self.bias, factor @ self.bias_rows


class _Embedding:
    def __init__(self, module: torch.nn.Embedding, calls: list[tuple[Tensor, Tensor]], rows: int) -> None:
        self.weight = module.weight
        self.ids = torch.cat([_by_example(x, rows, module).reshape(rows, -1) for x, _ in calls], 1)
        self.g = torch.cat([_by_example(g, rows, module) for _, g in calls], 1).float()
        if module.padding_idx is not None:
            self.g = self.g * (self.ids != module.padding_idx).unsqueeze(-1)
        # one key per (example, token): each example's gradient row for a token sums its positions
        vocabulary = module.num_embeddings
        keys = self.ids + vocabulary * torch.arange(rows, device=self.ids.device).unsqueeze(1)
        unique, where = torch.unique(keys.flatten(), return_inverse=True)
        summed = torch.zeros(len(unique), self.g.shape[-1], device=self.g.device).index_add_(
            0, where, self.g.flatten(0, 1)
        )
        self.squares = torch.zeros(rows, device=self.g.device).index_add_(
            0, unique // vocabulary, summed.square().sum(1)
        )

    def clipped(self, factor: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        scaled = (self.g * factor[:, None, None]).flatten(0, 1)
        yield self.weight, torch.zeros_like(self.weight, dtype=scaled.dtype).index_add_(0, self.ids.flatten(), scaled)


class _PerExample:
    """Any other layer: its per-example gradients, by Opacus's rule for the type or by ``torch.func``."""

    def __init__(self, module: torch.nn.Module, calls: list[tuple[Tensor, Tensor]], rows: int) -> None:
        from opacus import GradSampleModule
        from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

        rule = GradSampleModule.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
        trainable = {id(p) for p in _trainable(module)}
        self.grads: dict[int, tuple[Tensor, Tensor]] = {}
        for x, g in calls:
            for p, per_example in rule(module, [_per_row(x, rows, module)], _per_row(g, rows, module)).items():
                if id(p) in trainable:
                    _, before = self.grads.get(id(p), (p, 0))
                    self.grads[id(p)] = (p, before + per_example.float())
        self.squares = sum(
            (grad.flatten(1).square().sum(1) for _, grad in self.grads.values()),
            torch.zeros(rows, device=calls[0][1].device),
        )

    def clipped(self, factor: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        for p, grad in self.grads.values():
            yield p, torch.einsum("n,n...->...", factor, grad)


def _layer(module: torch.nn.Module, calls: list[tuple[Tensor, Tensor]], rows: int) -> _Layer:
    if type(module) is torch.nn.Linear:
        return _Linear(module, calls, rows)
    if type(module) is torch.nn.Embedding and module.weight.requires_grad and not module.scale_grad_by_freq:
        return _Embedding(module, calls, rows)
    return _PerExample(module, calls, rows)


class ClippedSum:
    """Hooks on every module that holds a trainable weight of ``model``; after each forward,
    :meth:`__call__` runs the backward pass and returns the clipped sum per trainable parameter.
    :meth:`close` removes the hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.calls: list[tuple[torch.nn.Module, Tensor, Tensor]] = []
        self.modules = [module for module in model.modules() if _trainable(module)]
        self.handles = [module.register_forward_hook(self._record, with_kwargs=True) for module in self.modules]

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        inputs = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(inputs, Tensor) or not isinstance(output, Tensor):
            raise RuntimeError(f"per-example gradients of {type(module).__name__}: it takes or gives no single tensor")
        self.calls.append((module, inputs.detach(), output))

    def __call__(self, loss: Tensor, rows: int, max_norm: float) -> list[Tensor]:
        """Each of the ``rows`` examples' gradient of ``loss`` (a sum over them) clipped to L2 norm
        ``max_norm`` over all trainable weights, summed; one tensor per trainable parameter."""
        recorded, self.calls = self.calls, []
        # the backward pass: the layers' output gradients only (the weights' would be unclipped)
        grads = torch.autograd.grad(loss, [output for _, _, output in recorded], allow_unused=True)
        if self.calls:  # a layer ran again inside the backward pass: its inputs would be the rerun's
            self.calls = []
            raise RuntimeError(
                "per-example clipping: layers were recomputed in the backward pass (gradient checkpointing)"
            )
        calls: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {}
        for (module, inputs, _), grad in zip(recorded, grads, strict=True):
            if grad is not None:
                calls.setdefault(module, []).append((inputs, grad))
        layers = [_layer(module, pairs, rows) for module, pairs in calls.items()]
        # each example's norm over every layer, and its clipping factor
        squares = sum((layer.squares for layer in layers), torch.zeros(rows, device=loss.device))
        factor = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        total = {id(p): torch.zeros_like(p) for p in self.params}
        for layer in layers:
            for p, grad in layer.clipped(factor):
                total[id(p)].add_(grad.to(p.dtype))
        return [total[id(p)] for p in self.params]

    def close(self) -> None:
        """The plain model again: no hooks, and none of the torch.func rules Opacus hangs on layers."""
        for handle in self.handles:
            handle.remove()
        for module in self.modules:
            if hasattr(module, "ft_compute_sample_grad"):
                del module.ft_compute_sample_grad
