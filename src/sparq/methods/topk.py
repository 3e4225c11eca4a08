"""Exact top-k attention (an oracle upper bound, FlexGen-style): the k positions with the
largest true attention probability (summed over the query heads sharing a KV head), then
exact attention over them. Finding them needs all of K, which the oracle gets for free:
only the ``2 * k * d`` elements of the kept rows are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import attend_kept, lengths_of, rows_for, topk_mask, true_probs
from . import _check
from .base import DecodeInputs, DecodeMethod


@dataclass(frozen=True)
class TopK(DecodeMethod):
    fraction: float
    min_k: int = 16
    name = "topk"

    def __post_init__(self) -> None:
        _check.fraction("TopK", self.fraction)
        _check.integer("TopK", "min_k", self.min_k, 1)

    def k_for(self, length: int, head_dim: int) -> int:
        return rows_for(self.fraction, length, head_dim, min_k=self.min_k)

    def attend(self, x: DecodeInputs) -> Tensor:
        d = x.key.shape[-1]
        probs = true_probs(x.query, x.key, x.valid, x.scale).sum(2)  # [B, Hkv, S]
        ks = torch.tensor([self.k_for(n, d) for n in lengths_of(x.valid)], device=x.valid.device)
        allowed = x.valid[:, None, :].expand_as(probs)
        keep = topk_mask(probs, allowed, ks)
        return attend_kept(x.query, x.key, x.value, keep, x.scale)

    def data_fraction(self, length: int, head_dim: int) -> float:
        k = self.k_for(length, head_dim)
        return 1.0 if k >= length else k / length

    @property
    def label(self) -> str:
        return f"topk(f={self.fraction:g})"
