"""Small records that cross the wire as one float64 row per rank, in an all-gather.

A record is a frozen dataclass that also derives from :class:`WireRow`: its fields, ``rank``
excepted (the row's position says it), travel in declaration order, so adding a field to the
dataclass is all it takes to send it. Whole numbers travel exactly: float64 holds every integer
up to 2**53.
"""

from __future__ import annotations

from dataclasses import Field, fields
from typing import Any, TypeVar

import torch

R = TypeVar("R", bound="WireRow")


class WireRow:
    """Mixin for a frozen dataclass sent as one row (see the module docstring)."""

    @classmethod
    def wire_fields(cls) -> list[Field[Any]]:
        return [f for f in fields(cls) if f.name != "rank"]  # type: ignore[arg-type]

    def to_row(self) -> torch.Tensor:
        return torch.tensor([float(getattr(self, f.name)) for f in self.wire_fields()], dtype=torch.float64)

    @classmethod
    def placeholder(cls) -> torch.Tensor:
        """The row of a rank that has nothing to say (the aggregator), the shape of everyone's."""
        return torch.zeros(len(cls.wire_fields()), dtype=torch.float64)

    @classmethod
    def from_row(cls: type[R], row: list[float], **given: Any) -> R:
        """The record from a row's values (``given`` adds the fields the row does not carry)."""
        values = {f.name: int(v) if f.type in ("int", int) else v for f, v in zip(cls.wire_fields(), row, strict=True)}
        return cls(**values, **given)
