"""What Gemma 2 and Gemma 3 share, as transformers' modeling_gemma2/3 compute it:
  * RMSNorm scales by (1 + w), in fp32, before casting back (Llama casts, then scales by w);
  * the embedding is scaled by sqrt(hidden) (the model's own embed_tokens does it);
  * scores scale by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5 (the attention module's `scaling`);
  * four norms per layer: input, post-attention (on the attention output, before the residual),
    pre- and post-feedforward (around the MLP, again before the residual);
  * gelu-tanh gated MLP; logits optionally soft-capped (`Family.logits`);
  * "sliding_attention" layers (`layer_types`) attend to the last `sliding_window` positions: the
    fast loop keeps them dense over a ring of that many positions (`Family.window`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .base import Family, eps_of, gated_mlp, pre_attention, row_parallel


def gemma_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma's RMSNorm: x / rms(x) * (1 + w), in fp32, then back to the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def post_attention(x: Tensor, attn: Tensor, *, wo: Tensor, bo, attn_norm_w: Tensor, ff_in_w: Tensor,
                   ff_out_w: Tensor, eps: float, wgu, inter: int, wd: Tensor, act,
                   reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """x + norm(o(attn)), then x + norm(gated MLP of norm(x))."""
    o = row_parallel(attn, wo, reduce)
    x = x + gemma_norm(o + bo if bo is not None else o, attn_norm_w, eps)
    d = gated_mlp(gemma_norm(x, ff_in_w, eps), wgu, inter, wd, act, reduce)
    return x + gemma_norm(d, ff_out_w, eps)


class Gemma(Family):
    """Gemma 2 and 3's layer; subclasses name the model types and differ around it."""

    pre_attention = staticmethod(pre_attention)
    post_attention = staticmethod(post_attention)

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if getattr(model.config, "use_bidirectional_attention", False):
            raise ValueError(f"{type(model).__name__} ({self.name}) with bidirectional attention (an encoder) cannot "
                             f"decode in the fast loop")
        super().__init__(model, **kwargs)

    def layer_weights(self, layer: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        post = dict(attn_norm_w=layer.post_attention_layernorm.weight,
                    ff_in_w=layer.pre_feedforward_layernorm.weight, ff_out_w=layer.post_feedforward_layernorm.weight,
                    eps=eps_of(layer.post_attention_layernorm), **self.mlp_and_output_weights(layer))
        return self.attention_weights(layer, gemma_norm), post
