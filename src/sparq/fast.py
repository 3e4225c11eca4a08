"""A fast decode loop for Llama-family Hugging Face models: static cache, CUDA graphs, SparQ kernels.

transformers' own generate loop spends most of a decode step outside attention (about 3x the
bandwidth floor for an 8B model, shared/notes/anchors.md), which would swamp SparQ's gain. This
loop runs the model's own modules (projections, norms, rotary embedding, MLP) in a flat,
gpt-fast-style forward over a preallocated `SparQKernelCache`:
  * prefill: chunked, dense (PyTorch SDPA over the cache prefix), writing K, Kᵀ, V and the fp32
    V sum in place; prompts of different lengths sit left-aligned, row b valid up to lengths[b];
  * decode: one token per row at its own position, attention by the chosen method (dense SDPA
    over the static buffer with a length mask, or the SparQ kernels), greedy argmax, all on the
    device with static shapes, so the whole step is captured once in a CUDA graph and replayed.
Dense and SparQ run in this same loop, so a speed-up measured here is SparQ's own.

Supported: Llama, Mistral (full attention), Qwen2, Qwen3 (QK-norm) and SmolLM2 style models.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .config import SparQConfig
from .kernel_cache import KernelCacheLayer
from .kernels.plans import PlanCache


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, L, d]; cos, sin [B, L, d]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


@dataclass
class DecodeTimings:
    prefill_s: float
    decode_s: float
    steps: int

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / self.steps if self.steps else float("nan")


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm, in fp32 then back to the input dtype, as transformers computes it."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _linear(x: Tensor, w, b) -> Tensor:
    """One projection, or several (a tuple of weights/biases) concatenated along the output."""
    if isinstance(w, tuple):
        return torch.cat([F.linear(x, wi, bi) for wi, bi in zip(w, b)], dim=-1)
    return F.linear(x, w, b)


def pre_attention(x: Tensor, cos: Tensor, sin: Tensor, *, norm_w: Tensor, eps: float, wqkv, bqkv,
                  n_q: int, n_kv: int, qn_w, kn_w, qk_eps: float, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, L, hidden] -> q [B, Hq, L, d], k, v [B, Hkv, L, d]: norm, one QKV projection, (QK-norm), rotary."""
    B, L, _ = x.shape
    h = rms_norm(x, norm_w, eps)
    q, k, v = _linear(h, wqkv, bqkv).split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(B, L, n_q, head_dim)
    k = k.view(B, L, n_kv, head_dim)
    v = v.view(B, L, n_kv, head_dim).transpose(1, 2)
    if qn_w is not None:  # Qwen3
        q, k = rms_norm(q, qn_w, qk_eps), rms_norm(k, kn_w, qk_eps)
    return _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin), v


def post_attention(x: Tensor, attn: Tensor, *, wo: Tensor, bo, norm_w: Tensor, eps: float, wgu, inter: int,
                   wd: Tensor, act, reduce=None) -> Tensor:
    """Residual + output projection, then residual + gated MLP: down(act(gate(h)) * up(h)).
    `reduce` (tensor parallelism) sums the row-parallel projections' partial outputs over ranks."""
    o = F.linear(attn, wo)
    o = reduce(o) if reduce is not None else o
    x = x + (o + bo if bo is not None else o)  # the bias once, after the sum over ranks
    h = rms_norm(x, norm_w, eps)
    gate, up = _linear(h, wgu, (None, None) if isinstance(wgu, tuple) else None).split([inter, inter], dim=-1)
    d = F.linear(act(gate) * up, wd)
    return x + (reduce(d) if reduce is not None else d)


class FastDecoder:
    """Greedy batched decoding of a Llama-family model with `method` = "dense" or a SparQConfig."""

    def __init__(self, model: nn.Module, method: str | SparQConfig, *, batch: int, max_len: int,
                 prefill_chunk: int = 4096, keep_key_t: bool | None = None, compile: bool | None = None,
                 fuse_weights: bool = True, tp_group=None) -> None:
        _check_method(method)
        if batch < 1 or max_len < 2:
            raise ValueError(f"batch must be >= 1 and max_len >= 2, got {batch}, {max_len}")
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not all(_is_llama_like(layer) for layer in layers):
            raise ValueError(f"FastDecoder supports Llama-family models (Llama, Mistral, Qwen2, Qwen3); "
                             f"got {type(model).__name__}")
        cfg = model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
                cfg.sliding_window < max_len:
            raise ValueError(f"sliding-window attention ({cfg.sliding_window}) shorter than max_len is not supported")
        self.model, self.inner, self.layers = model, inner, layers
        self.method = self._requested = method
        self.batch, self.max_len, self.prefill_chunk = batch, max_len, prefill_chunk
        attn = layers[0].self_attn
        self.head_dim = attn.head_dim
        # tensor parallelism: transformers' tp_plan (DTensor weights: each rank holds its heads and
        # MLP columns) or an explicit tp_group for a model that holds one rank's slices already.
        # Either way this rank runs attention over its own heads and cache; the row-parallel
        # projections (o_proj, down_proj) are summed over the ranks.
        w = attn.q_proj.weight
        if isinstance(w, DTensor):
            if tp_group is None:
                tp_group = w.device_mesh.get_group()
        self.tp_group = tp_group
        self.num_q_heads = _local(attn.q_proj.weight).shape[0] // self.head_dim
        self.num_kv_heads = _local(attn.k_proj.weight).shape[0] // self.head_dim
        self.scale = attn.scaling
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Kᵀ is SparQ's step-1 copy; keep it for dense too when switching methods on one cache.
        keep_key_t = method != "dense" if keep_key_t is None else keep_key_t
        plans = PlanCache(growth=False)  # the kernels' plans: one workspace shared by all layers
        self.cache = [KernelCacheLayer(batch, self.num_kv_heads, self.head_dim, max_len, self.dtype, self.device,
                                       keep_key_t=keep_key_t, plans=plans) for _ in layers]
        # one lengths tensor for all layers (they advance together): advanced once per step, before
        # the layers; each layer appends at the previous lengths (_write_pos)
        self.lengths = self.cache[0].lengths
        for c in self.cache[1:]:
            c.lengths = self.lengths
        self._write_pos = torch.zeros_like(self.lengths)
        self._valid: Tensor | None = None
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._graphs: dict = {}  # method -> captured step, so switching back costs no capture
        self.fuse_weights = fuse_weights
        self._reduce = None if self.tp_group is None else functools.partial(_all_reduce, group=self.tp_group)
        self.weights = [self._weights(layer) for layer in layers]
        if compile is None:
            compile = self.device.type == "cuda"
        if compile:
            # one compiled graph per (batch, model shape): allow more than dynamo's default 8
            cfg_ = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg_, name):
                    setattr(cfg_, name, max(getattr(cfg_, name), 64))
        self._pre = torch.compile(pre_attention, fullgraph=True, dynamic=False) if compile else pre_attention
        self._post = torch.compile(post_attention, fullgraph=True, dynamic=False) if compile else post_attention

    @property
    def _graph(self) -> "torch.cuda.CUDAGraph | None":
        """The captured step of the current method, if any."""
        return self._graphs.get(self.method)

    def use(self, method: str | SparQConfig) -> None:
        """Switch the decode method (same cache; the CUDA graph is captured again on next step)."""
        _check_method(method)
        if method != "dense" and self.cache[0].key_t is None:
            raise ValueError("this cache has no transposed key copy: build it with keep_key_t=True for SparQ")
        self.method = method

    def autotune(self, methods=None, steps: int = 4) -> dict:
        """Time `steps` decode steps of each method from the current state (after a prefill),
        restore the state and keep the fastest; returns {method: seconds per step}.

        SparQ's kernels have a fixed cost per layer that dense attention does not, so below some
        batch x context (about 64k tokens for the Llama-3-8B shape on an H100) dense is faster;
        measuring on the actual device and shape is the simplest policy that never loses to dense
        by more than the timing noise. Default candidates: dense and the current method."""
        methods = list(methods) if methods is not None else ["dense", self.method]
        for m in methods:
            _check_method(m)
        snap = self.snapshot()
        times = {}
        for m in dict.fromkeys(methods):
            self.use(m)
            self.decode(1)  # capture + warm-up
            self.restore(snap)
            _, secs = self.decode(steps)
            self.restore(snap)
            times[m] = secs / steps
        self.use(min(times, key=times.get))
        return times

    def snapshot(self) -> list[Tensor]:
        """The decode state (lengths, V sums, positions, next tokens); K/V past lengths is scratch."""
        return [t.clone() for t in [self.lengths, self.positions, self.tokens] + [c.value_sum for c in self.cache]]

    def restore(self, snap: list[Tensor]) -> None:
        for dst, src in zip([self.lengths, self.positions, self.tokens] + [c.value_sum for c in self.cache], snap):
            dst.copy_(src)

    # ---- the model, layer by layer -------------------------------------------------------------
    # The math lives in pure functions of tensors (`pre_attention`, `post_attention`) so that on
    # CUDA one torch.compile of each serves every layer (fusing norms, rotary and the MLP's
    # elementwise work: a decode step is otherwise ~60 small kernels per layer).

    def _weights(self, layer: nn.Module) -> tuple[dict, dict]:
        attn, mlp = layer.self_attn, layer.mlp
        wqkv, bqkv = self._fused((attn.q_proj, attn.k_proj, attn.v_proj))
        wgu, _ = self._fused((mlp.gate_proj, mlp.up_proj))
        pre = dict(norm_w=layer.input_layernorm.weight, eps=_eps(layer.input_layernorm), wqkv=wqkv, bqkv=bqkv,
                   n_q=self.num_q_heads, n_kv=self.num_kv_heads,
                   qn_w=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
                   kn_w=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
                   qk_eps=_eps(attn.q_norm) if hasattr(attn, "q_norm") else 0.0, head_dim=self.head_dim)
        post = dict(wo=_local(attn.o_proj.weight), bo=None if attn.o_proj.bias is None else _local(attn.o_proj.bias),
                    norm_w=layer.post_attention_layernorm.weight, eps=_eps(layer.post_attention_layernorm), wgu=wgu,
                    inter=_local(mlp.gate_proj.weight).shape[0], wd=_local(mlp.down_proj.weight), act=mlp.act_fn,
                    reduce=self._reduce)
        return pre, post

    @torch.no_grad()
    def _fused(self, linears: tuple[nn.Linear, ...]):
        """(weight, bias) of the linears concatenated along the output dim.

        With fuse_weights, the modules' weights become views of one tensor (same values, no extra
        memory; a second decoder on the same model finds them already adjacent), so a decode step
        reads them in one matrix-vector product instead of several small ones. Otherwise (or for
        tensor-parallel DTensor weights) the tuple of weights, applied one by one."""
        ws = [_local(m.weight) for m in linears]
        bs = [None if m.bias is None else _local(m.bias) for m in linears]
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

    def _logits(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.inner.norm(x))

    # ---- prefill ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """input_ids [B, L] left-aligned (row b real up to lengths[b]); returns the first new tokens [B]."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor [batch, length], got {input_ids.dtype} "
                            f"{tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if B != self.batch:
            raise ValueError(f"input_ids has batch {B}, the decoder was built for {self.batch}")
        if L >= self.max_len:
            raise ValueError(f"prompt length {L} leaves no room in max_len={self.max_len}")
        lengths = torch.as_tensor(lengths)
        if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > L:
            raise ValueError(f"lengths must be [{B}] with values in [1, {L}] (input_ids' length), "
                             f"got {lengths.tolist()}")
        lengths = lengths.to(self.device)
        last_hidden = torch.zeros(B, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
        for start in range(0, L, self.prefill_chunk):
            end = min(L, start + self.prefill_chunk)
            ids = input_ids[:, start:end].to(self.device)
            pos = torch.arange(start, end, device=self.device).expand(B, -1)
            x = self.inner.embed_tokens(ids)
            cos, sin = self.inner.rotary_emb(x, pos)
            # causal over the whole prefix: query i (absolute start+i) sees keys j <= start+i
            mask = torch.arange(end, device=self.device)[None, :] <= pos[0][:, None]
            for (pre, post), c in zip(self.weights, self.cache):
                q, k, v = pre_attention(x, cos, sin, **pre)
                c.key[:, :, start:end] = k
                c.value[:, :, start:end] = v
                if c.key_t is not None:
                    c.key_t[:, :, :, start:end] = k.transpose(-1, -2)
                out = F.scaled_dot_product_attention(q, c.key[:, :, :end], c.value[:, :, :end], attn_mask=mask,
                                                     scale=self.scale, enable_gqa=True)
                x = post_attention(x, out.transpose(1, 2).reshape(B, end - start, -1), **post)
            # keep the hidden state of each row's last real token
            inside = (lengths - 1 >= start) & (lengths - 1 < end)
            idx = (lengths - 1 - start).clamp(0, end - start - 1)
            picked = x[torch.arange(B, device=self.device), idx]
            last_hidden = torch.where(inside[:, None], picked, last_hidden)
        valid = torch.arange(self.max_len, device=self.device)[None, :] < lengths[:, None]
        for c in self.cache:
            # padding past each row's length must not count (it is overwritten by later tokens)
            c.key.masked_fill_(~valid[:, None, :, None], 0)
            c.value.masked_fill_(~valid[:, None, :, None], 0)
            if c.key_t is not None:
                c.key_t.masked_fill_(~valid[:, None, None, :], 0)
            c.value_sum.copy_(c.value.float().sum(2))
            c.lengths.copy_(lengths)
        self.positions.copy_(lengths)
        first = self._logits(last_hidden).argmax(-1)
        self.tokens.copy_(first)
        return first

    # ---- decode ----------------------------------------------------------------------------------

    def _attend(self, c: KernelCacheLayer, q: Tensor) -> Tensor:
        """q [B, Hq, d] over the layer's cache -> [B, Hq, d]."""
        if self.method == "dense":
            # SDPA over the whole static buffer with a length mask: on the H100 0.97-1.04x the time
            # of SDPA flash and 1.03-1.15x that of cuDNN on an exact-length cache (which would need
            # a shape per length, no single CUDA graph); max_len is the context plus the new tokens,
            # so it reads ~only the valid rows. benchmarks/results/e2e-check-H100.log
            out = F.scaled_dot_product_attention(q[:, :, None], c.key, c.value, attn_mask=self._valid,
                                                 scale=self.scale, enable_gqa=True)
            return out[:, :, 0]
        return c.attend(q, self.method, scale=self.scale)

    def _step(self) -> None:
        """Feed self.tokens at self.positions; leave the next greedy tokens in self.tokens."""
        x = self.inner.embed_tokens(self.tokens[:, None])  # [B, 1, hidden]
        cos, sin = self.inner.rotary_emb(x, self.positions[:, None])  # once for all layers
        self._write_pos.copy_(self.lengths)
        self.lengths.add_((self.lengths < self.max_len).to(self.lengths.dtype))
        if self.method == "dense":
            self._valid = (torch.arange(self.max_len, device=self.device)[None, :] < self.lengths[:, None])[:, None, None]
        for (pre, post), c in zip(self.weights, self.cache):
            q, k, v = self._pre(x, cos, sin, **pre)
            c.append(k, v, positions=self._write_pos, advance=False)
            out = self._attend(c, q[:, :, 0])
            x = self._post(x, out.reshape(self.batch, 1, -1), **post)
        self.tokens.copy_(self._logits(x)[:, 0].argmax(-1))
        self.positions.add_(1)

    @torch.inference_mode()
    def step(self, use_graph: bool = True) -> Tensor:
        """One decode step (replays a captured CUDA graph on CUDA); returns the new tokens [B]."""
        if use_graph and self.device.type == "cuda":
            if self._graph is None:
                self._capture()
            self._graph.replay()
        else:
            self._step()
        return self.tokens

    def _capture(self) -> None:
        # Warm up on a side stream (compiles kernels, allocates workspaces), then capture.
        # Warm-up steps write one token past each row's length: restore the state around them.
        snap = self.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.restore(snap)
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.restore(snap)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.restore(snap)
        self._graphs[self.method] = graph

    def decode(self, steps: int, use_graph: bool = True) -> tuple[Tensor, float]:
        """`steps` decode steps from the current state: (tokens [B, steps], seconds, capture excluded)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        if use_graph and self.device.type == "cuda" and self._graph is None:
            self._capture()
        sync()
        t0 = time.perf_counter()
        out = [self.step(use_graph).clone() for _ in range(steps)]
        sync()
        return torch.stack(out, 1), time.perf_counter() - t0

    def generate(self, input_ids: Tensor, lengths: Tensor, max_new_tokens: int,
                 use_graph: bool = True, autotune: bool = False) -> tuple[Tensor, DecodeTimings]:
        """Greedy tokens [B, max_new_tokens] and timings (prefill; decode steps after the first token).
        autotune: after the prefill, decode with the faster of dense and the decoder's method
        (`autotune()`; its timing steps are not counted, the state is restored after them)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if int(lengths.max()) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        first = self.prefill(input_ids, lengths).clone()
        sync()
        prefill_s = time.perf_counter() - t0
        if autotune and self.device.type == "cuda" and use_graph:
            self.autotune(["dense", self._requested])
        rest, decode_s = self.decode(max_new_tokens - 1, use_graph)
        return torch.cat([first[:, None], rest], 1), DecodeTimings(prefill_s, decode_s, max_new_tokens - 1)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a tensor-parallel (DTensor) parameter; the plain tensor otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t.data


def _all_reduce(t: Tensor, group) -> Tensor:
    """Sum over the tensor-parallel ranks (a functional collective: traceable by torch.compile and
    capturable in a CUDA graph with NCCL)."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(t, "sum", group)


def _check_method(method) -> None:
    if not (method == "dense" or isinstance(method, SparQConfig)):
        raise TypeError(f"method must be 'dense' or a SparQConfig, got {method!r}")


def _is_llama_like(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    if mlp.gate_proj.bias is not None:
        return False
    return (attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
            and hasattr(layer, "mlp") and not hasattr(layer, "pre_feedforward_layernorm"))


def kv_bytes_per_token(model_config, *, sparq: bool, dtype_bytes: int = 2) -> int:
    """Cache bytes one token costs across all layers: K and V, plus Kᵀ for SparQ's step 1."""
    c = model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = 2 * c.num_key_value_heads * head_dim * dtype_bytes
    if sparq:
        per_layer = per_layer * 3 // 2
    return per_layer * c.num_hidden_layers


def decode_floor_bytes(model_config, n_params: int, batch: int, context: int, fraction: float,
                       dtype_bytes: int = 2) -> float:
    """Bytes one decode step must read: all weights once plus `fraction` of the dense K/V cache."""
    kv = kv_bytes_per_token(model_config, sparq=False, dtype_bytes=dtype_bytes) * batch * context
    return n_params * dtype_bytes + fraction * kv


@torch.inference_mode()
def fast_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, method: str | SparQConfig,
                  max_new_tokens: int, *, autotune: bool = False, eos_token_id: int | None = None,
                  **decoder_kwargs) -> tuple[Tensor, DecodeTimings]:
    """Greedy generation through `FastDecoder` from a tokenizer's batch (left- or right-padded
    input_ids with their attention_mask); returns new tokens [B, max_new_tokens] (after a row's
    eos_token_id, its tokens are eos) and the timings. autotune: see `FastDecoder.generate`."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    lengths = attention_mask.sum(-1).cpu()
    if int(lengths.min()) < 1:
        raise ValueError("every row needs at least one prompt token")
    aligned = torch.zeros_like(input_ids).cpu()
    for b in range(input_ids.shape[0]):
        aligned[b, :lengths[b]] = input_ids[b][attention_mask[b].bool()].cpu()
    aligned = aligned[:, :int(lengths.max())]
    max_len = int(lengths.max()) + max_new_tokens
    dec = FastDecoder(model, method, batch=input_ids.shape[0], max_len=max_len, **decoder_kwargs)
    tokens, timings = dec.generate(aligned, lengths, max_new_tokens, autotune=autotune)
    if eos_token_id is not None:
        done = (tokens == eos_token_id).int().cumsum(1) > 0
        done = torch.cat([torch.zeros_like(done[:, :1]), done[:, :-1]], 1)
        tokens = tokens.masked_fill(done, eos_token_id)
    return tokens, timings
