"""Dense attention where the fast loop runs it itself: prefill (every layer) and decode on layers no
decode method runs (soft-capped ones). PyTorch SDPA, or, with attention logit soft-capping (Gemma 2;
SDPA has no such option), the scores computed explicitly as transformers' eager path does:
scores * scale -> tanh(. / cap) * cap -> masked -> softmax in fp32 -> @ V."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods import DecodeInputs


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                    softcap: float | None = None) -> Tensor:
    """q [B, Hq, L, d]; k, v [B, Hkv, S, d] (grouped-query: Hq a multiple of Hkv); mask (True =
    attend) broadcastable to [B, 1, L, S]. Returns [B, Hq, L, d]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    B, Hq, L, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    # query head h reads KV head h // g: fold each group's queries into rows, so K and V are read as they are
    scores = (q.reshape(B, Hkv, g * L, d) @ k.transpose(-1, -2)) * scale  # [B, Hkv, g * L, S]
    scores = torch.tanh(scores / softcap) * softcap
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))[:, :, None]  # [B|1, 1, 1, L, S]
    scores = scores.view(B, Hkv, g, L, S).masked_fill(~m, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (p.view(B, Hkv, g * L, S) @ v).view(B, Hq, L, d)


def softcapped_decode(x: DecodeInputs, softcap: float) -> Tensor:
    """A decode step's dense soft-capped attention over `x` (query [B, Hq, d]): [B, Hq, d]."""
    out = dense_attention(x.query[:, :, None], x.key, x.value, x.valid[:, None, None, :], x.scale, softcap)
    return out[:, :, 0]
