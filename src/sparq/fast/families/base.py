"""The adapter a model family implements for the fast loop, and the math families share.

A family turns a Hugging Face model into tensors per layer and two pure functions of tensors,
`pre_attention` (norm, projections, rotary: x -> q, k, v) and `post_attention` (output projection,
residuals, MLP), which the loop compiles once each on CUDA and calls for every layer. The loop
owns everything else: the caches, attention (by the decode method), prefill, CUDA graphs.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


class Family(ABC):
    """One model family's math. Subclasses set `model_types` (the config.model_type values they
    run) and `name`, implement `layer_weights`, and set `pre_attention` and `post_attention`
    (static methods); they override `qkv`, `gate_up`, `heads`, `rotary` or `logits` where the
    family's layout differs from Llama's.

    Layout facts the loop reads (from the config alone, so it can refuse a method before any work):
    `window(layer)` (sliding-window layers: dense over a ring) and `softcap` (attention logit
    soft-capping: every layer dense, soft-capped)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module, *, max_len: int, fuse_weights: bool = True,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.model, self.inner = model, model.model
        self.layers = self.inner.layers
        self.config = model.config
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.num_q_heads, self.num_kv_heads = self.heads(attn)  # this rank's heads under TP
        self.scale: float = attn.scaling
        self.max_len, self.fuse_weights, self.reduce = max_len, fuse_weights, reduce
        cap = getattr(self.config, "attn_logit_softcapping", None)
        self.softcap: float | None = float(cap) if cap else None

    @functools.cached_property
    def weights(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Each layer's keyword arguments of `pre_attention` and `post_attention` (built on first use:
        with fuse_weights this re-points the model's projection weights at one tensor per layer)."""
        return [self.layer_weights(layer) for layer in self.layers]

    @abstractmethod
    def layer_weights(self, layer: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        """The keyword arguments of `pre_attention` and `post_attention` for one layer."""

    # The two halves of a layer around attention: pure functions of tensors (static methods), so
    # one torch.compile of each serves every layer.
    pre_attention: ClassVar[Callable[..., tuple[Tensor, Tensor, Tensor]]]
    post_attention: ClassVar[Callable[..., Tensor]]

    # ---- weights: Llama's layout (separate q/k/v and gate/up projections); overridden for fused ones

    def heads(self, attn: nn.Module) -> tuple[int, int]:
        """(query heads, KV heads) this rank computes."""
        return (local(attn.q_proj.weight).shape[0] // self.head_dim,
                local(attn.k_proj.weight).shape[0] // self.head_dim)

    def qkv(self, attn: nn.Module) -> tuple[Any, Any]:
        """(weight, bias) of the q, k, v projections as one (see `fused`)."""
        return self.fused((attn.q_proj, attn.k_proj, attn.v_proj))

    def gate_up(self, mlp: nn.Module) -> Any:
        """The gate and up projections' weights as one (gate rows first)."""
        return self.fused((mlp.gate_proj, mlp.up_proj))[0]

    def attention_weights(self, layer: nn.Module, norm: Callable[..., Tensor]) -> dict[str, Any]:
        """`pre_attention`'s keyword arguments (QK-norm weights where the attention has them)."""
        attn = layer.self_attn
        wqkv, bqkv = self.qkv(attn)
        qk_norm = hasattr(attn, "q_norm")
        return dict(norm=norm, norm_w=layer.input_layernorm.weight, eps=eps_of(layer.input_layernorm), wqkv=wqkv,
                    bqkv=bqkv, n_q=self.num_q_heads, n_kv=self.num_kv_heads,
                    qn_w=attn.q_norm.weight if qk_norm else None, kn_w=attn.k_norm.weight if qk_norm else None,
                    qk_eps=eps_of(attn.q_norm) if qk_norm else 0.0, head_dim=self.head_dim)

    def mlp_and_output_weights(self, layer: nn.Module) -> dict[str, Any]:
        """The output projection's and the gated MLP's weights (`post_attention` keyword arguments)."""
        attn, mlp = layer.self_attn, layer.mlp
        wd = local(mlp.down_proj.weight)
        return dict(wo=local(attn.o_proj.weight), bo=None if attn.o_proj.bias is None else local(attn.o_proj.bias),
                    wgu=self.gate_up(mlp), inter=wd.shape[1], wd=wd,
                    act=getattr(mlp, "act_fn", None) or mlp.activation_fn, reduce=self.reduce)

    # ---- the rest of the model around the layers

    def embed(self, ids: Tensor) -> Tensor:
        return self.inner.embed_tokens(ids)

    def rotary(self, x: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(cos, sin) [B, L, d] for every layer at positions [B, L], computed once per kind of layer."""
        cos_sin = self.inner.rotary_emb(x, positions)
        return [cos_sin] * len(self.layers)

    def window(self, layer: int) -> int | None:
        """The layer's sliding window (it attends to the last `window` positions, densely), or None.

        As transformers masks them: with `layer_types` (Gemma 2/3, Qwen2/3), the "sliding_attention"
        layers; without (Mistral, Phi-3), every layer once `sliding_window` is set, counted only where
        it is shorter than the cache (a window that never cuts is full attention, and the method runs)."""
        w = getattr(self.config, "sliding_window", None)
        if not w:
            return None
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            return w if types[layer] == "sliding_attention" else None
        return w if w < self.max_len else None

    def logits(self, x: Tensor) -> Tensor:
        logits = self.model.lm_head(self.inner.norm(x))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

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
        with torch.inference_mode(False):  # a normal tensor even when built inside fast_generate's
            fused = torch.cat(ws)  # inference mode: the model's parameters must stay usable for autograd
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
    """Rotary embedding of x [B, H, L, d] with cos, sin [B, L, r] (rotate-half convention) on the
    first r <= d dims of each head (partial rotary, e.g. Phi-4-mini); the rest pass through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def pre_attention(x: Tensor, cos: Tensor, sin: Tensor, *, norm: Callable[..., Tensor], norm_w: Tensor, eps: float,
                  wqkv, bqkv, n_q: int, n_kv: int, qn_w, kn_w, qk_eps: float,
                  head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, L, hidden] -> q [B, Hq, L, d], k, v [B, Hkv, L, d]: the family's norm, one QKV
    projection, QK-norm per head where the family has it (qn_w, kn_w; Qwen3, Gemma 3), rotary."""
    B, L, _ = x.shape
    h = norm(x, norm_w, eps)
    q, k, v = linear(h, wqkv, bqkv).split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(B, L, n_q, head_dim)
    k = k.view(B, L, n_kv, head_dim)
    v = v.view(B, L, n_kv, head_dim).transpose(1, 2)
    if qn_w is not None:
        q, k = norm(q, qn_w, qk_eps), norm(k, kn_w, qk_eps)
    return rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin), v


def row_parallel(x: Tensor, w: Tensor, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    """A row-parallel projection (o_proj, down_proj): under tensor parallelism `reduce` sums the
    ranks' partial outputs."""
    y = F.linear(x, w)
    return reduce(y) if reduce is not None else y


def gated_mlp(h: Tensor, wgu, inter: int, wd: Tensor, act, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    """down(act(gate(h)) * up(h)), gate and up from one fused projection (gate rows first)."""
    gate, up = linear(h, wgu, (None, None) if isinstance(wgu, tuple) else None).split([inter, inter], dim=-1)
    return row_parallel(act(gate) * up, wd, reduce)
