"""Reference definitions the tests check fedsilo's in-place, flat-buffer code against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsilo.model import float_tensors


def flatten(model: torch.nn.Module) -> torch.Tensor:
    """A copy of the model's floating-point state as one flat fp32 vector (float_tensors order)."""
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in float_tensors(model)])


def weighted_average(models: Sequence[torch.Tensor], examples: Sequence[int]) -> torch.Tensor:
    """Example-weighted mean of flat model vectors: the FedAvg definition, in float64."""
    if not models or len(models) != len(examples):
        raise ValueError(f"need one example count per model, got {len(models)} and {len(examples)}")
    shapes = {tuple(m.shape) for m in models}
    if len(shapes) != 1:
        raise ValueError(f"models differ in shape: {sorted(shapes)}")
    if any(n <= 0 for n in examples):
        raise ValueError(f"example counts must be positive, got {list(examples)}")
    total = sum(examples)
    out = torch.zeros_like(models[0], dtype=torch.float64)
    for model, n in zip(models, examples, strict=False):
        out.add_(model.to(torch.float64), alpha=n / total)
    return out.to(models[0].dtype)
