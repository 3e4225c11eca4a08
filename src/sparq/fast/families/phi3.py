"""Phi-3 (model_type phi3: Phi-3/3.5-mini and -medium, Phi-4-mini): Llama's math with fused weights.

Differences from Llama, as transformers' modeling_phi3 computes them:
  * one qkv_proj (q rows, then k, then v) and one gate_up_proj (gate rows, then up): already the
    fused layout the loop reads, used as they are;
  * partial rotary where the config sets `partial_rotary_factor` (Phi-4-mini: 0.75): the rotary
    tables cover the first dims of each head only (`base.rope` passes the rest through);
  * `sliding_window` (Phi-3-mini-4k: 2047), when set, applies to every layer (`Family.window`).
Tensor parallelism is refused: transformers' Phi-3 plan gathers the fused projections' outputs
(replicated), which is not the per-rank head split the loop runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import local
from .llama import Llama


class Phi3(Llama):
    name = "phi3"
    model_types = ("phi3",)

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if kwargs.get("reduce") is not None:  # the loop passes one exactly when the model is tensor-parallel
            raise ValueError(f"{type(model).__name__} (phi3): the fast loop does not run Phi-3 tensor-parallel "
                             f"(its fused qkv/gate_up projections are not split by heads)")
        super().__init__(model, **kwargs)

    def heads(self, attn: nn.Module) -> tuple[int, int]:
        return self.config.num_attention_heads, self.config.num_key_value_heads

    def qkv(self, attn: nn.Module) -> tuple[Any, Any]:
        proj = attn.qkv_proj
        return local(proj.weight), None if proj.bias is None else local(proj.bias)

    def gate_up(self, mlp: nn.Module) -> Any:
        return local(mlp.gate_up_proj.weight)
