"""Dense decode attention on the same split-K kernels: the baseline inside the fast decode loop.

`dense_decode(query, key, value, lengths, scale)` runs `_gather_attention_kernel` in DENSE mode
(positions 0..lengths[b]-1, no index list) split over the sequence, then `_combine_kernel`
without reallocation. It reads exactly the valid K/V rows once per KV head (2 * len * d * elt
bytes), whatever the buffer's capacity, has static shapes (lengths stay on the device) and so
replays under a CUDA graph: what a static-cache dense decode step can best do.
"""

from __future__ import annotations


import torch
import triton

from . import interpreting
from .gather_attention import _combine_kernel, _gather_attention_kernel

_PARTIALS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def dense_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor,
                 scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, Hq, d]; key, value [B, Hkv, S, d] (last dim contiguous); lengths int [B] on the device."""
    batch, num_q_heads, head_dim = query.shape
    _, num_kv_heads, s_cap, _ = key.shape
    g = num_q_heads // num_kv_heads
    bh = batch * num_kv_heads
    block_n = 32 if interpreting() else 64
    # enough splits to fill the GPU several times over, each a whole number of tiles
    n_split = max(1, min(triton.cdiv(s_cap, block_n), triton.cdiv(8 * _sm_count(query.device), bh)))
    chunk = triton.cdiv(triton.cdiv(s_cap, n_split), block_n) * block_n
    n_split = triton.cdiv(s_cap, chunk)
    key_ = (query.device, batch, num_q_heads, n_split, head_dim)
    if key_ not in _PARTIALS:
        rows = batch * num_q_heads * n_split
        f32 = dict(device=query.device, dtype=torch.float32)
        _PARTIALS[key_] = (torch.empty(rows, **f32), torch.empty(rows, **f32), torch.empty(rows, head_dim, **f32),
                           torch.empty(rows, **f32))
    part_m, part_l, part_acc, part_a = _PARTIALS[key_]
    query = query.contiguous()
    lengths = lengths.to(torch.int32)
    _gather_attention_kernel[(bh, n_split)](
        query, key, value, lengths, lengths, part_m, part_m,
        part_m, part_l, part_acc, part_a,
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        num_kv_heads, s_cap, 0, n_split, float(scale),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=head_dim, CHUNK=chunk, BLOCK_N=block_n,
        REALLOC=False, DENSE=True, num_warps=4,
    )
    if out is None:
        out = torch.empty_like(query)
    _combine_kernel[(batch * num_q_heads,)](
        part_m, part_l, part_acc, part_a, part_a, lengths, lengths, out,
        num_q_heads, n_split,
        G=g, D=head_dim, NS_PAD=triton.next_power_of_2(n_split), REALLOC=False, num_warps=4,
    )
    return out


def dense_decode_bytes(lengths_total: int, num_kv_heads: int, head_dim: int, elt: int) -> int:
    """K and V rows read: the floor of any dense decode step."""
    return 2 * lengths_total * num_kv_heads * head_dim * elt


__all__ = ["dense_decode", "dense_decode_bytes"]
