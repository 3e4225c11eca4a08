"""Dense attention: reads all of K and V every step. The baseline every method is compared to."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import reference
from .base import DecodeInputs, DecodeMethod


@dataclass(frozen=True)
class Dense(DecodeMethod):
    name = "dense"

    def attend(self, x: DecodeInputs) -> Tensor:
        return reference.dense_reference(x.query, x.key, x.value, x.valid, x.scale)

    def data_fraction(self, length: int, head_dim: int) -> float:
        return 1.0
