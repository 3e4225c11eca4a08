"""Gemma 3 text models (model_type gemma3_text, e.g. gemma-3-270m, gemma-3-1b).

Differences from Llama, as transformers' modeling_gemma3 computes them:
  * RMSNorm scales by (1 + w), in fp32, before casting back (Llama casts, then scales by w);
  * the embedding is scaled by sqrt(hidden) (the model's own embed_tokens does it);
  * q and k are RMS-normalised per head (QK-norm) before rotary; scores scale by
    query_pre_attn_scalar ** -0.5, not head_dim ** -0.5 (the attention module's `scaling`);
  * four norms per layer: input, post-attention (on the attention output, before the residual),
    pre- and post-feedforward (around the MLP, again before the residual);
  * gelu-tanh gated MLP; logits optionally soft-capped;
  * sliding-window layers (layer_types "sliding_attention") use their own rotary base and attend
    to the last `sliding_window` positions: the fast loop keeps them dense over a ring of that
    many positions; only the global layers run the decode method.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Family, eps_of, linear, local, rope


def gemma_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma's RMSNorm: x / rms(x) * (1 + w), in fp32, then back to the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def pre_attention(x: Tensor, cos: Tensor, sin: Tensor, *, norm_w: Tensor, eps: float, wqkv, bqkv,
                  n_q: int, n_kv: int, qn_w: Tensor, kn_w: Tensor, qk_eps: float,
                  head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, L, hidden] -> q [B, Hq, L, d], k, v [B, Hkv, L, d]: norm, one QKV projection, QK-norm, rotary."""
    B, L, _ = x.shape
    h = gemma_norm(x, norm_w, eps)
    q, k, v = linear(h, wqkv, bqkv).split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = gemma_norm(q.view(B, L, n_q, head_dim), qn_w, qk_eps)
    k = gemma_norm(k.view(B, L, n_kv, head_dim), kn_w, qk_eps)
    v = v.view(B, L, n_kv, head_dim).transpose(1, 2)
    return rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin), v


def post_attention(x: Tensor, attn: Tensor, *, wo: Tensor, bo, attn_norm_w: Tensor, ff_in_w: Tensor,
                   ff_out_w: Tensor, eps: float, wgu, inter: int, wd: Tensor, act,
                   reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """x + norm(o(attn)), then x + norm(down(act(gate(h)) * up(h))) with h = norm(x).
    `reduce` (tensor parallelism) sums the row-parallel projections' partial outputs over ranks."""
    o = F.linear(attn, wo)
    o = reduce(o) if reduce is not None else o
    x = x + gemma_norm(o + bo if bo is not None else o, attn_norm_w, eps)
    h = gemma_norm(x, ff_in_w, eps)
    gate, up = linear(h, wgu, (None, None) if isinstance(wgu, tuple) else None).split([inter, inter], dim=-1)
    d = F.linear(act(gate) * up, wd)
    return x + gemma_norm(reduce(d) if reduce is not None else d, ff_out_w, eps)


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3_text",)
    pre_attention = staticmethod(pre_attention)
    post_attention = staticmethod(post_attention)

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        cfg = model.config
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with bidirectional attention (an encoder) cannot decode in the fast loop")
        if getattr(cfg, "attn_logit_softcapping", None):
            raise ValueError("attention logit soft-capping is not supported")
        super().__init__(model, **kwargs)
        self.layer_types: list[str] = list(cfg.layer_types)

    def layer_weights(self, layer: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        attn, mlp = layer.self_attn, layer.mlp
        wqkv, bqkv = self.fused((attn.q_proj, attn.k_proj, attn.v_proj))
        wgu, _ = self.fused((mlp.gate_proj, mlp.up_proj))
        pre = dict(norm_w=layer.input_layernorm.weight, eps=eps_of(layer.input_layernorm), wqkv=wqkv, bqkv=bqkv,
                   n_q=self.num_q_heads, n_kv=self.num_kv_heads, qn_w=attn.q_norm.weight, kn_w=attn.k_norm.weight,
                   qk_eps=eps_of(attn.q_norm), head_dim=self.head_dim)
        post = dict(wo=local(attn.o_proj.weight), bo=None if attn.o_proj.bias is None else local(attn.o_proj.bias),
                    attn_norm_w=layer.post_attention_layernorm.weight, ff_in_w=layer.pre_feedforward_layernorm.weight,
                    ff_out_w=layer.post_feedforward_layernorm.weight, eps=eps_of(layer.post_attention_layernorm),
                    wgu=wgu, inter=local(mlp.gate_proj.weight).shape[0], wd=local(mlp.down_proj.weight),
                    act=mlp.act_fn, reduce=self.reduce)
        return pre, post

    def rotary(self, x: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        # one rotary table per layer type (the sliding layers have their own base frequency)
        by_type = {t: self.inner.rotary_emb(x, positions, t) for t in dict.fromkeys(self.layer_types)}
        return [by_type[t] for t in self.layer_types]

    def window(self, layer: int) -> int | None:
        return self.config.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def logits(self, x: Tensor) -> Tensor:
        logits = super().logits(x)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits
