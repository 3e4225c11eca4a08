"""The adapter a model family implements for the fast loop, and the tensor helpers families share.

A family turns a Hugging Face model into tensors per layer and two pure functions of tensors,
`pre_attention` (norm, projections, rotary: x -> q, k, v) and `post_attention` (output projection,
residuals, MLP), which the loop compiles once each on CUDA and calls for every layer. The loop
owns everything else: the caches, attention (by the decode method), prefill, CUDA graphs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


class Family(ABC):
    """One model family's math. Subclasses set `model_types` (the config.model_type values they
    run) and `name`, implement `layer_weights`, `pre_attention` and `post_attention`, and override
    `rotary`, `window` or `logits` where the family differs from Llama's layout."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module, *, max_len: int, fuse_weights: bool = True,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.model, self.inner = model, model.model
        self.layers = self.inner.layers
        self.config = model.config
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.num_q_heads = local(attn.q_proj.weight).shape[0] // self.head_dim  # this rank's heads under TP
        self.num_kv_heads = local(attn.k_proj.weight).shape[0] // self.head_dim
        self.scale: float = attn.scaling
        self.max_len, self.fuse_weights, self.reduce = max_len, fuse_weights, reduce
        self.weights: list[tuple[dict[str, Any], dict[str, Any]]] = [self.layer_weights(layer) for layer in self.layers]

    @abstractmethod
    def layer_weights(self, layer: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        """The keyword arguments of `pre_attention` and `post_attention` for one layer."""

    # The two halves of a layer around attention: pure functions of tensors (static methods), so
    # one torch.compile of each serves every layer.
    pre_attention: ClassVar[Callable[..., tuple[Tensor, Tensor, Tensor]]]
    post_attention: ClassVar[Callable[..., Tensor]]

    def embed(self, ids: Tensor) -> Tensor:
        return self.inner.embed_tokens(ids)

    def rotary(self, x: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(cos, sin) [B, L, d] for every layer at positions [B, L], computed once per kind of layer."""
        cos_sin = self.inner.rotary_emb(x, positions)
        return [cos_sin] * len(self.layers)

    def window(self, layer: int) -> int | None:
        """The layer's sliding window (it attends to the last `window` positions, densely), or None."""
        return None

    def logits(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.inner.norm(x))

    @torch.no_grad()
    def fused(self, linears: tuple[nn.Linear, ...]) -> tuple[Any, Any]:
        """(weight, bias) of the linears concatenated along the output dim.

        With fuse_weights, the modules' weights become views of one tensor (same values, no extra
        memory; a second decoder on the same model finds them already adjacent), so a decode step
        reads them in one matrix-vector product instead of several small ones. Otherwise (or for
        tensor-parallel DTensor weights) the tuple of weights, applied one by one."""
        ws = [local(m.weight) for m in linears]
        bs = [None if m.bias is None else local(m.bias) for m in linears]
        bias = None if all(b is None for b in bs) else \
            torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(ws, bs)])
        if not self.fuse_weights:
            return tuple(ws), tuple(bs)
        rows = sum(w.shape[0] for w in ws)
        adjacent = all(w.is_contiguous() and w.untyped_storage().data_ptr() == ws[0].untyped_storage().data_ptr()
                       for w in ws) and all(b.storage_offset() == a.storage_offset() + a.numel()
                                            for a, b in zip(ws, ws[1:]))
        if adjacent:
            return ws[0].as_strided((rows, ws[0].shape[1]), (ws[0].shape[1], 1)), bias
        fused = torch.cat(ws)
        for m, piece in zip(linears, fused.split([w.shape[0] for w in ws])):
            old = m.weight
            if isinstance(old, DTensor):  # keep the module a working tensor-parallel layer
                piece = DTensor.from_local(piece, old.device_mesh, old.placements, run_check=False,
                                           shape=old.shape, stride=old.stride())
            m.weight = nn.Parameter(piece, requires_grad=old.requires_grad)
        return fused, bias


def local(t: Tensor) -> Tensor:
    """This rank's shard of a tensor-parallel (DTensor) parameter; the plain tensor otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t.data


def eps_of(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def linear(x: Tensor, w: Any, b: Any) -> Tensor:
    """One projection, or several (a tuple of weights/biases) concatenated along the output."""
    if isinstance(w, tuple):
        return torch.cat([F.linear(x, wi, bi) for wi, bi in zip(w, b)], dim=-1)
    return F.linear(x, w, b)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [B, H, L, d] with cos, sin [B, L, d] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
