"""Llama-family math: Llama, Mistral (full attention), Qwen2, Qwen3 (QK-norm), SmolLM2.

A layer: x + o(attn(rope(q), rope(k), v)) with q, k, v from RMSNorm(x), then
x + down(act(gate(h)) * up(h)) with h = RMSNorm(x). Qwen3 normalises q and k per head before rotary.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Family, eps_of, linear, local, rope


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm, in fp32 then back to the input dtype, as transformers computes it."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def pre_attention(x: Tensor, cos: Tensor, sin: Tensor, *, norm_w: Tensor, eps: float, wqkv, bqkv,
                  n_q: int, n_kv: int, qn_w, kn_w, qk_eps: float, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, L, hidden] -> q [B, Hq, L, d], k, v [B, Hkv, L, d]: norm, one QKV projection, (QK-norm), rotary."""
    B, L, _ = x.shape
    h = rms_norm(x, norm_w, eps)
    q, k, v = linear(h, wqkv, bqkv).split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(B, L, n_q, head_dim)
    k = k.view(B, L, n_kv, head_dim)
    v = v.view(B, L, n_kv, head_dim).transpose(1, 2)
    if qn_w is not None:  # Qwen3
        q, k = rms_norm(q, qn_w, qk_eps), rms_norm(k, kn_w, qk_eps)
    return rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin), v


def post_attention(x: Tensor, attn: Tensor, *, wo: Tensor, bo, norm_w: Tensor, eps: float, wgu, inter: int,
                   wd: Tensor, act, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Residual + output projection, then residual + gated MLP: down(act(gate(h)) * up(h)).
    `reduce` (tensor parallelism) sums the row-parallel projections' partial outputs over ranks."""
    o = F.linear(attn, wo)
    o = reduce(o) if reduce is not None else o
    x = x + (o + bo if bo is not None else o)  # the bias once, after the sum over ranks
    h = rms_norm(x, norm_w, eps)
    gate, up = linear(h, wgu, (None, None) if isinstance(wgu, tuple) else None).split([inter, inter], dim=-1)
    d = F.linear(act(gate) * up, wd)
    return x + (reduce(d) if reduce is not None else d)


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    pre_attention = staticmethod(pre_attention)
    post_attention = staticmethod(post_attention)

    def __init__(self, model: nn.Module, *, max_len: int, **kwargs: Any) -> None:
        cfg = model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
                cfg.sliding_window < max_len:
            raise ValueError(f"sliding-window attention ({cfg.sliding_window}) shorter than max_len is not supported "
                             f"for the {self.name} family")
        super().__init__(model, max_len=max_len, **kwargs)

    def layer_weights(self, layer: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        attn, mlp = layer.self_attn, layer.mlp
        wqkv, bqkv = self.fused((attn.q_proj, attn.k_proj, attn.v_proj))
        wgu, _ = self.fused((mlp.gate_proj, mlp.up_proj))
        qk_norm = hasattr(attn, "q_norm")
        pre = dict(norm_w=layer.input_layernorm.weight, eps=eps_of(layer.input_layernorm), wqkv=wqkv, bqkv=bqkv,
                   n_q=self.num_q_heads, n_kv=self.num_kv_heads,
                   qn_w=attn.q_norm.weight if qk_norm else None, kn_w=attn.k_norm.weight if qk_norm else None,
                   qk_eps=eps_of(attn.q_norm) if qk_norm else 0.0, head_dim=self.head_dim)
        post = dict(wo=local(attn.o_proj.weight), bo=None if attn.o_proj.bias is None else local(attn.o_proj.bias),
                    norm_w=layer.post_attention_layernorm.weight, eps=eps_of(layer.post_attention_layernorm), wgu=wgu,
                    inter=local(mlp.gate_proj.weight).shape[0], wd=local(mlp.down_proj.weight), act=mlp.act_fn,
                    reduce=self.reduce)
        return pre, post
