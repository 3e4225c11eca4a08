"""Small helpers the baseline methods share: budgets, position ranks, masked attention.

Every method counts data the paper's way: elements of K and V (16-bit each) read per KV head
and decode step, over dense attention's ``2 * S * d``. A method given a target fraction ``f``
solves for the number of rows k it may read in full after its own overheads (index, metadata or
bookkeeping reads), so that all methods spend the same bytes at the same target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference

NEG_INF = float("-inf")


def rows_for(fraction: float, length: int, head_dim: int, overhead: float = 0.0,
             per_row: float | None = None, min_k: int = 0) -> int:
    """Largest k with ``overhead + k * per_row <= fraction * 2 * length * head_dim`` (per_row = 2d),
    at least ``min_k``, at most ``length``; all of them at fraction >= 1."""
    if fraction >= 1:  # the whole budget: keep everything, which is dense attention
        return int(length)
    per_row = 2 * head_dim if per_row is None else per_row
    k = math.floor((fraction * 2 * length * head_dim - overhead) / per_row + 1e-9)
    return int(min(length, max(min_k, k, 1)))


def ranks(valid: Tensor) -> tuple[Tensor, Tensor]:
    """(rank from the start, rank from the end) of every valid position, [B, S] int64.

    rank 0 is the oldest valid token; from_end 1 is the newest. Both ignore padding, so a
    padded and an unpadded copy of a sequence get the same numbers on their real tokens.
    """
    v = valid.long()
    return v.cumsum(-1) - 1, v.flip(-1).cumsum(-1).flip(-1)


def topk_mask(scores: Tensor, allowed: Tensor, n: Tensor) -> Tensor:
    """[B, H, S] bool: the n[b] highest-scoring allowed positions per (batch, head)."""
    out = torch.zeros_like(allowed, dtype=torch.bool)
    max_n = int(n.max()) if n.numel() else 0
    if max_n <= 0:
        return out
    cand = scores.masked_fill(~allowed, NEG_INF)
    max_n = min(max_n, cand.shape[-1])
    # stable: ties go to the older position, so padding never changes the choice
    idx = cand.sort(dim=-1, descending=True, stable=True).indices[..., :max_n]
    ok = torch.arange(max_n, device=scores.device) < n[:, None, None]
    ok = ok & allowed.gather(-1, idx)  # never pick a position that was not allowed
    out.scatter_(-1, idx, ok.expand_as(idx))
    return out


def grouped(query: Tensor, num_kv_heads: int) -> Tensor:
    return reference._grouped(query.float(), num_kv_heads)


def true_probs(query: Tensor, key: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Exact attention probabilities [B, Hkv, g, S] (fp32) over the valid positions."""
    q = grouped(query, key.shape[1])
    logits = (q @ key.float().transpose(-1, -2)) * scale
    return logits.masked_fill(~valid[:, None, None, :], NEG_INF).softmax(-1)


def attend_kept(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, scale: float) -> Tensor:
    """Exact attention over keep [B, Hkv, S] (must be a subset of the valid positions): [B, Hq, d]."""
    y = reference.gather_attention(query, key, value, keep, scale)
    b, hq, d = query.shape
    return y.reshape(b, hq, d).to(query.dtype)


def lengths_of(valid: Tensor) -> list[int]:
    return [int(n) for n in valid.sum(-1).tolist()]
