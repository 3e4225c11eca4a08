"""Llama-family math: Llama, Mistral, Qwen2, Qwen3 (QK-norm), SmolLM2.

A layer: x + o(attn(rope(q), rope(k), v)) with q, k, v from RMSNorm(x), then
x + down(act(gate(h)) * up(h)) with h = RMSNorm(x). Qwen3 normalises q and k per head before rotary.
Sliding-window layers (Mistral's `sliding_window`, Qwen2/3's "sliding_attention" layers) stay
dense over a ring (`Family.window`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .base import Family, eps_of, gated_mlp, pre_attention, row_parallel


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm, in fp32 then back to the input dtype, as transformers computes it."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def post_attention(x: Tensor, attn: Tensor, *, wo: Tensor, bo, norm_w: Tensor, eps: float, wgu, inter: int,
                   wd: Tensor, act, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Residual + output projection, then residual + gated MLP of RMSNorm(x)."""
    o = row_parallel(attn, wo, reduce)
    x = x + (o + bo if bo is not None else o)  # the bias once, after the sum over ranks
    return x + gated_mlp(rms_norm(x, norm_w, eps), wgu, inter, wd, act, reduce)


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    pre_attention = staticmethod(pre_attention)
    post_attention = staticmethod(post_attention)

    def layer_weights(self, layer: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        post = dict(norm_w=layer.post_attention_layernorm.weight, eps=eps_of(layer.post_attention_layernorm),
                    **self.mlp_and_output_weights(layer))
        return self.attention_weights(layer, rms_norm), post
