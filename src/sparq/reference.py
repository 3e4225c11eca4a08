"""SparQ attention in readable PyTorch: the specification every kernel is tested against.

One decode step (a single query token per sequence), vectorised over batch and heads.
Shapes: query [B, Hq, d]; key, value [B, Hkv, S, d]; valid [B, S] (bool, True = a real
position); g = Hq // Hkv query heads share one KV head (query head h uses KV head h // g).
Everything is computed in fp32 whatever the input dtype; the caller casts the result back.

The three steps of the paper (Ribar et al., 2024):
  1. approx_scores    - score every position with the r largest-|q| dimensions only.
  2. select_topk      - keep the local window plus the best-scoring positions (k in all).
  3. gather_attention - exact attention over the kept positions, then
     reallocate       - mix in the mean of V by the approximate mass that was not kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SparQConfig

NEG_INF = float("-inf")


def _grouped(query: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hq, d] -> [B, Hkv, g, d]: the query heads that share each KV head."""
    batch, num_q_heads, head_dim = query.shape
    return query.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)


def select_dims(query_groups: Tensor, r: int) -> Tensor:
    """Step 1a: per KV head, the r dimensions with the largest |q| summed over its query heads.

    query_groups [B, Hkv, g, d] -> indices [B, Hkv, r'] with r' = min(r, d).
    """
    head_dim = query_groups.shape[-1]
    weight = query_groups.abs().sum(dim=2)  # [B, Hkv, d]
    if r >= head_dim:
        return torch.arange(head_dim, device=weight.device).expand(weight.shape)
    # a stable sort: ties go to the lower dimension, so the choice is fully defined
    return weight.sort(dim=-1, descending=True, stable=True).indices[..., :r]


def approx_scores(
    query: Tensor, key: Tensor, valid: Tensor, r: int, scale: float, key_t: Tensor | None = None
) -> Tensor:
    """Step 1: approximate attention probabilities s_hat [B, Hkv, g, S] (fp32).

    Reads r columns of K: from key_t [B, Hkv, d, S] when given (whole contiguous rows there,
    which is why the cache keeps that copy), else from key [B, Hkv, S, d].

    s_hat = softmax(q[i1] . K[:, i1]^T * scale / sqrt(||q[i1]||_1 / ||q||_1)) over valid positions.
    The temperature correction keeps the approximate logits on the scale of the true ones
    (with scale = 1/sqrt(d) it is the paper's sqrt(d * ||q[i1]||_1 / ||q||_1)).
    """
    q = _grouped(query.float(), key.shape[1])  # [B, Hkv, g, d]
    dims = select_dims(q, r)  # [B, Hkv, r]
    q_sel = q.gather(-1, dims.unsqueeze(2).expand(-1, -1, q.shape[2], -1))  # [B, Hkv, g, r]
    if key_t is not None:
        cols = key_t.gather(2, dims.unsqueeze(-1).expand(-1, -1, -1, key_t.shape[-1])).float()  # [B, Hkv, r, S]
    else:
        cols = key.gather(-1, dims.unsqueeze(2).expand(-1, -1, key.shape[2], -1)).float().transpose(-1, -2)
    logits = q_sel @ cols  # [B, Hkv, g, S]

    q_l1 = q.abs().sum(-1, keepdim=True)
    sel_l1 = q_sel.abs().sum(-1, keepdim=True)
    # A zero query gives zero logits whatever the temperature: avoid 0/0 there.
    ratio = torch.where(q_l1 > 0, sel_l1 / q_l1.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    ratio = ratio.clamp_min(torch.finfo(torch.float32).tiny)
    logits = logits * (scale / ratio.sqrt())
    logits = logits.masked_fill(~valid[:, None, None, :], NEG_INF)
    return logits.softmax(dim=-1)


def budgets(config: SparQConfig, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sequence: (number of valid positions, k, local window), each an int64 tensor [B]."""
    lengths = valid.sum(-1)
    k = torch.tensor([config.k_for(int(n)) for n in lengths.tolist()], device=valid.device)
    local = torch.tensor([config.local_for(int(n)) for n in lengths.tolist()], device=valid.device)
    return lengths, k, local


def select_topk(scores: Tensor, valid: Tensor, k: Tensor, local: Tensor) -> Tensor:
    """Step 2a: keep mask [B, Hkv, S].

    scores [B, Hkv, S] (s_hat summed over each KV head's query heads); valid [B, S];
    k, local [B]. Keeps the last `local` valid positions plus the `k - local` other valid
    positions with the highest scores (ties to the earlier position); every valid position
    when k >= the valid count.
    """
    lengths = valid.sum(-1)
    # Valid positions at or after each position: 1 for the newest token, `length` for the oldest.
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)
    is_local = valid & (from_end <= local[:, None])
    keep_all = (k >= lengths)[:, None]

    candidates = scores.masked_fill(~(valid & ~is_local)[:, None, :], NEG_INF)
    n_top = k - local  # [B]
    max_top = int(n_top.max()) if n_top.numel() else 0
    top = torch.zeros_like(candidates, dtype=torch.bool)
    if max_top > 0:
        # A stable sort, so that ties (a zero query makes every score equal) go to the earlier
        # position: the choice then depends only on the order of the valid positions, not on
        # where padding put them, and a left-padded row selects what it would alone.
        idx = candidates.sort(dim=-1, descending=True, stable=True).indices[..., :max_top]  # [B, Hkv, max_top]
        rank_ok = torch.arange(max_top, device=scores.device) < n_top[:, None, None]
        top.scatter_(-1, idx, rank_ok.expand_as(idx))
    keep = is_local[:, None, :] | top
    return torch.where(keep_all[:, None, :], valid[:, None, :], keep) & valid[:, None, :]


def gather_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, scale: float) -> Tensor:
    """Step 2b: y = softmax(q . K_kept^T * scale) V_kept, [B, Hkv, g, d] (fp32).

    Reads only the kept rows of K and V (gathered, as the kernels do), so it costs O(k d)
    rather than O(S d). Rows are padded to the largest count kept by any (sequence, KV head);
    the padding rows are masked out.
    """
    q = _grouped(query.float(), key.shape[1])
    n_keep = int(keep.sum(-1).max())
    idx = keep.float().topk(n_keep, dim=-1, sorted=False).indices  # [B, Hkv, n]: kept first
    kept = keep.gather(-1, idx)  # False only on padding rows
    rows = idx.unsqueeze(-1).expand(-1, -1, -1, key.shape[-1])
    k_rows = key.gather(2, rows).float()
    # Zero the rows not kept so that garbage (even NaN) in padding can never leak in.
    v_rows = value.gather(2, rows).float().masked_fill(~kept[..., None], 0.0)
    logits = (q @ k_rows.transpose(-1, -2)) * scale  # [B, Hkv, g, n]
    logits = logits.masked_fill(~kept[:, :, None, :], NEG_INF)
    return logits.softmax(dim=-1) @ v_rows


def mean_value(value: Tensor, valid: Tensor, value_sum: Tensor | None = None) -> Tensor:
    """Mean of V over valid positions, [B, Hkv, d] (fp32), from the cache's running sum if given."""
    if value_sum is None:
        value_sum = value.float().masked_fill(~valid[:, None, :, None], 0.0).sum(2)
    return value_sum.float() / valid.sum(-1).clamp_min(1)[:, None, None]


def reallocate(y: Tensor, s_hat: Tensor, keep: Tensor, v_mean: Tensor, keep_all: Tensor) -> Tensor:
    """Step 3: alpha * y + (1 - alpha) * mean(V), alpha = s_hat mass on the kept positions.

    Where every position is kept alpha is exactly 1, so the step is exactly dense attention.
    """
    alpha = (s_hat * keep[:, :, None, :]).sum(-1, keepdim=True)  # [B, Hkv, g, 1]
    alpha = torch.where(keep_all[:, None, None, None], 1.0, alpha)
    return alpha * y + (1.0 - alpha) * v_mean[:, :, None, :]


def sparq_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    config: SparQConfig,
    valid: Tensor,
    scale: float,
    key_t: Tensor | None = None,
    value_sum: Tensor | None = None,
) -> Tensor:
    """The whole SparQ step: [B, Hq, d] in query's dtype. Inputs as in the module docstring;
    key_t and value_sum are the cache's optional copies (same numbers, cheaper reads)."""
    batch, num_q_heads, head_dim = query.shape
    lengths, k, local = budgets(config, valid)
    keep_all = k >= lengths

    s_hat = approx_scores(query, key, valid, config.r, scale, key_t)  # [B, Hkv, g, S]
    keep = select_topk(s_hat.sum(2), valid, k, local)  # [B, Hkv, S]
    y = gather_attention(query, key, value, keep, scale)  # [B, Hkv, g, d]
    if config.reallocate:
        y = reallocate(y, s_hat, keep, mean_value(value, valid, value_sum), keep_all)
    return y.reshape(batch, num_q_heads, head_dim).to(query.dtype)


def dense_reference(query: Tensor, key: Tensor, value: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Exact attention of one query token over the valid positions, [B, Hq, d] in query's dtype."""
    batch, num_q_heads, head_dim = query.shape
    keep = valid[:, None, :].expand(-1, key.shape[1], -1)
    y = gather_attention(query, key, value, keep, scale)
    return y.reshape(batch, num_q_heads, head_dim).to(query.dtype)
