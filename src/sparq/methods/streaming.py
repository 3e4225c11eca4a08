"""Attention sinks + local window (StreamingLLM, Xiao et al. 2023; LM-Infinite, Han et al. 2023).

Each decode step reads the first ``sinks`` valid tokens and the most recent ``k - sinks``:
``2 * k * d`` elements, nothing else (the selection needs no data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import attend_kept, lengths_of, ranks, rows_for
from . import _check
from .base import DecodeInputs, DecodeMethod


@dataclass(frozen=True)
class Streaming(DecodeMethod):
    """fraction: target share of dense data; sinks: attention-sink tokens kept (at most k/2)."""

    fraction: float
    sinks: int = 16
    min_k: int = 16
    name = "streaming"

    def __post_init__(self) -> None:
        _check.fraction("Streaming", self.fraction)
        _check.integer("Streaming", "sinks", self.sinks, 0)
        _check.integer("Streaming", "min_k", self.min_k, 1)

    def k_for(self, length: int, head_dim: int) -> int:
        return rows_for(self.fraction, length, head_dim, min_k=self.min_k)

    def sinks_for(self, k: int) -> int:
        return min(self.sinks, k // 2)

    def keep_mask(self, valid: Tensor, head_dim: int) -> Tensor:
        rank, from_end = ranks(valid)
        ks = torch.tensor([self.k_for(n, head_dim) for n in lengths_of(valid)], device=valid.device)
        sinks = torch.tensor([self.sinks_for(int(k)) for k in ks.tolist()], device=valid.device)
        keep = (rank < sinks[:, None]) | (from_end <= (ks - sinks)[:, None])
        return keep & valid

    def attend(self, x: DecodeInputs) -> Tensor:
        keep = self.keep_mask(x.valid, x.key.shape[-1])
        keep = keep[:, None, :].expand(-1, x.key.shape[1], -1)
        return attend_kept(x.query, x.key, x.value, keep, x.scale)

    def data_fraction(self, length: int, head_dim: int) -> float:
        k = self.k_for(length, head_dim)
        return 1.0 if k >= length else k / length

    @property
    def label(self) -> str:
        return f"streaming(f={self.fraction:g}, sinks={self.sinks})"
