"""Public entry points: check the inputs, then run the reference (CPU) or the kernels (CUDA)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from .config import SparQConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lengths: Tensor | None,
    *,
    starts: Tensor | None = None,
    check_values: bool = True,
) -> None:
    """Raise TypeError/ValueError naming the problem; return None when the inputs are usable.

    check_values=False skips the checks that read tensor contents (finite query, lengths in
    range): they cost a device-to-host copy, which a CUDA-graph decode step must not make.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if query.dim() != 3:
        raise ValueError(f"query must have shape [B, Hq, d], got {tuple(query.shape)}")
    if key.dim() != 4:
        raise ValueError(f"key must have shape [B, Hkv, S, d], got {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    batch, num_q_heads, head_dim = query.shape
    kb, num_kv_heads, seq_len, kd = key.shape
    if kb != batch:
        raise ValueError(f"key batch size {kb} must equal query batch size {batch}")
    if kd != head_dim:
        raise ValueError(f"key head_dim {kd} must equal query head_dim {head_dim}")
    if min(batch, num_q_heads, head_dim, num_kv_heads, seq_len) < 1:
        raise ValueError(f"empty input: query {tuple(query.shape)}, key {tuple(key.shape)}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            raise TypeError(f"lengths must be an integer torch.Tensor of shape [B], got {type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [B] = ({batch},), got {tuple(lengths.shape)}")
        if lengths.device != query.device:
            raise ValueError(f"lengths must be on {query.device}, got {lengths.device}")
        if check_values and bool(((lengths < 1) | (lengths > seq_len)).any()):
            raise ValueError(f"lengths must lie in [1, S={seq_len}], got {lengths.tolist()}")
    if starts is not None:
        if lengths is None:
            raise ValueError("starts needs lengths: row b's valid positions are [starts[b], starts[b] + lengths[b])")
        if not isinstance(starts, Tensor) or starts.dtype.is_floating_point or starts.dtype == torch.bool:
            raise TypeError("starts must be an integer torch.Tensor of shape [B]")
        if starts.shape != (batch,) or starts.device != query.device:
            raise ValueError(f"starts must have shape [B] = ({batch},) on {query.device}, got "
                             f"{tuple(starts.shape)} on {starts.device}")
        if check_values and bool(((starts < 0) | (starts + lengths > seq_len)).any()):
            raise ValueError(f"starts + lengths must lie in [0, S={seq_len}], got starts {starts.tolist()}, "
                             f"lengths {lengths.tolist()}")
    if check_values and not bool(torch.isfinite(query).all()):
        raise ValueError("query contains NaN or infinite values")


def valid_mask(lengths: Tensor | None, batch: int, seq_len: int, device: torch.device,
               starts: Tensor | None = None) -> Tensor:
    """[B, S] bool: starts[b] <= position < starts[b] + lengths[b] (starts default 0; all True
    without lengths)."""
    positions = torch.arange(seq_len, device=device)
    if lengths is None:
        return positions.expand(batch, seq_len) >= 0
    if starts is None:
        return positions[None, :] < lengths[:, None]
    return (positions[None, :] >= starts[:, None]) & (positions[None, :] < (starts + lengths)[:, None])


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def sparq_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    config: SparQConfig,
    lengths: Tensor | None = None,
    *,
    scale: float | None = None,
    key_t: Tensor | None = None,
    value_sum: Tensor | None = None,
    starts: Tensor | None = None,
    plans=None,
    validate: bool = True,
) -> Tensor:
    """SparQ attention for one decode step.

    query [B, Hq, d]; key, value [B, Hkv, S, d] with Hq a multiple of Hkv; lengths: optional
    integer tensor [B], positions >= lengths[b] are padding. starts: optional integer tensor [B]
    for left-padded caches: row b's valid positions are then [starts[b], starts[b] + lengths[b]).
    scale defaults to 1/sqrt(d).
    Returns [B, Hq, d] in query's dtype; see `sparq.reference` for the exact semantics.

    CUDA fp16/bf16 inputs run on the Triton kernels (`sparq.kernels`). For speed pass the cache
    layout of `sparq.caches.static`: key_t [B, Hkv, d, S] (K transposed, contiguous along S) and
    value_sum fp32 [B, Hkv, d] (sum of V over the valid positions). Without them the kernel path
    builds both itself, reading the whole cache (correct, but slower than dense attention).
    plans: the cache's `sparq.kernels.dispatch.PlanCache` (launch plans and workspaces owned by
    the cache, reused by every layer and step); without one each call plans for itself.
    validate=False (or CUDA graph capture) skips the input checks that read tensor values,
    which would synchronise with the host.
    """
    if not isinstance(config, SparQConfig):
        raise TypeError(f"config must be a SparQConfig, got {type(config).__name__}")
    capturing = isinstance(query, Tensor) and query.is_cuda and torch.cuda.is_current_stream_capturing()
    check_inputs(query, key, value, lengths, starts=starts, check_values=validate and not capturing)
    scale = _scale(scale, query.shape[-1])
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        from . import kernels

        if kernels.available(query.device):
            from .kernels.dispatch import sparq_decode, supported

            if supported(query, key):
                if key.stride(-1) != 1 or value.stride(-1) != 1:  # the kernels read whole rows
                    key, value = key.contiguous(), value.contiguous()
                return sparq_decode(query, key, value, config, lengths, scale=scale,
                                    key_t=key_t, value_sum=value_sum, starts=starts, plans=plans)
    valid = valid_mask(lengths, key.shape[0], key.shape[2], key.device, starts)
    return reference.sparq_reference(query, key, value, config, valid, scale)


def dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lengths: Tensor | None = None,
    *,
    scale: float | None = None,
) -> Tensor:
    """Exact attention of one query token per sequence; same shapes and padding rules as sparq_attention."""
    check_inputs(query, key, value, lengths)
    scale = _scale(scale, query.shape[-1])
    valid = valid_mask(lengths, key.shape[0], key.shape[2], key.device)
    return reference.dense_reference(query, key, value, valid, scale)
