"""Quest (Tang et al. 2024): per-page min/max key bounds, then the pages with the top bounds.

Valid positions are cut into pages of ``page_size`` consecutive tokens (counted from the first
real token, so padding never shifts a page). Each page keeps the per-channel minimum and maximum
of its keys; a query's upper bound on a page's logit is ``sum_i max(q_i * min_i, q_i * max_i)``.
The KV head reads all pages' bounds (``2 * d * ceil(S / page)`` elements), keeps the pages with
the largest bound (summed over its query heads; the newest page always), and attends exactly
over them (``2 * k * d`` with k = pages kept * page size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import NEG_INF, attend_kept, grouped, lengths_of, ranks, rows_for
from . import _check
from .base import DecodeInputs, DecodeMethod


def page_bounds(key: Tensor, valid: Tensor, page_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(page index per position [B, S] (-1 for padding), min [B, Hkv, P, d], max [B, Hkv, P, d]).

    P = ceil(max valid length / page_size); pages with no valid token hold +inf/-inf.
    """
    b, hkv, s, d = key.shape
    rank, _ = ranks(valid)
    page = torch.where(valid, rank // page_size, torch.full_like(rank, -1))
    n_pages = max(1, math.ceil(int(valid.sum(-1).max()) / page_size))
    idx = page.clamp_min(0)[:, None, :, None].expand(b, hkv, s, d)
    k = key.float()
    big = torch.finfo(torch.float32).max
    k_lo = k.masked_fill(~valid[:, None, :, None], big)
    k_hi = k.masked_fill(~valid[:, None, :, None], -big)
    lo = torch.full((b, hkv, n_pages, d), big, dtype=torch.float32, device=key.device)
    hi = torch.full((b, hkv, n_pages, d), -big, dtype=torch.float32, device=key.device)
    lo = lo.scatter_reduce(2, idx, k_lo, reduce="amin")
    hi = hi.scatter_reduce(2, idx, k_hi, reduce="amax")
    return page, lo, hi


@dataclass(frozen=True)
class Quest(DecodeMethod):
    """fraction: target share of dense data; page_size: tokens per page (0 = 2 / fraction,
    so the bounds take half the budget... capped to [4, 64] and a power of two)."""

    fraction: float
    page_size: int = 0
    min_k: int = 16
    name = "quest"

    def __post_init__(self) -> None:
        _check.fraction("Quest", self.fraction)
        _check.integer("Quest", "page_size (0 = automatic)", self.page_size, 0)
        _check.integer("Quest", "min_k", self.min_k, 1)

    @property
    def page(self) -> int:
        if self.page_size:
            return self.page_size
        p = 2 ** round(math.log2(2.0 / self.fraction))
        return int(min(64, max(4, p)))

    def pages_for(self, length: int, head_dim: int) -> int:
        p = self.page
        if self.fraction >= 1:
            return math.ceil(length / p)
        meta = 2 * head_dim * math.ceil(length / p)
        rows = rows_for(self.fraction, length, head_dim, overhead=meta, min_k=self.min_k)
        return max(1, min(math.ceil(length / p), rows // p if rows >= p else 1))

    def attend(self, x: DecodeInputs) -> Tensor:
        d = x.key.shape[-1]
        p = self.page
        page, lo, hi = page_bounds(x.key, x.valid, p)  # lo/hi [B, Hkv, P, d]
        q = grouped(x.query, x.key.shape[1])  # [B, Hkv, g, d]
        bound = torch.maximum(q[:, :, :, None, :] * lo[:, :, None], q[:, :, :, None, :] * hi[:, :, None])
        score = bound.sum(-1).sum(2)  # [B, Hkv, P]
        lengths = lengths_of(x.valid)
        n_real = torch.tensor([math.ceil(n / p) for n in lengths], device=x.key.device)
        n_keep = torch.tensor([self.pages_for(n, d) for n in lengths], device=x.key.device)
        page_ids = torch.arange(score.shape[-1], device=x.key.device)
        real = page_ids[None, :] < n_real[:, None]  # [B, P]
        newest = page_ids[None, :] == (n_real - 1)[:, None]
        score = score.masked_fill(~real[:, None, :], NEG_INF).masked_fill(newest[:, None, :], float("inf"))
        max_n = int(n_keep.max())
        idx = score.topk(min(max_n, score.shape[-1]), dim=-1).indices
        ok = torch.arange(idx.shape[-1], device=x.key.device) < n_keep[:, None, None]
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, ok.expand_as(idx))
        chosen = chosen & real[:, None, :]
        keep = chosen.gather(-1, page.clamp_min(0)[:, None, :].expand(-1, chosen.shape[1], -1))
        keep = keep & x.valid[:, None, :]
        return attend_kept(x.query, x.key, x.value, keep, x.scale)

    def data_fraction(self, length: int, head_dim: int) -> float:
        p = self.page
        n_pages = math.ceil(length / p)
        kept = self.pages_for(length, head_dim)
        if kept >= n_pages:
            return 1.0
        return (2 * head_dim * n_pages + 2 * kept * p * head_dim) / (2 * length * head_dim)

    @property
    def label(self) -> str:
        return f"quest(f={self.fraction:g}, page={self.page})"
