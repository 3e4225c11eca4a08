"""The fast decode loop: static cache, CUDA graphs, any decode method, any registered model family.

transformers' own generate loop spends most of a decode step outside attention (about 3x the
bandwidth floor for an 8B model), which would swamp SparQ's gain. This loop runs the model's
math through its family adapter (`families/`: pure functions of tensors, compiled once each on
CUDA) in a flat, gpt-fast-style forward over preallocated caches (`KernelCacheLayer`; a
`WindowCache` ring for sliding-window layers):
  * prefill: chunked, dense (PyTorch SDPA over the cache prefix); prompts of different lengths sit
    left-aligned, row b valid up to lengths[b];
  * decode: one token per row at its own position; each layer's attention is the decode method's
    `attend` over the same `DecodeInputs` the Hugging Face path builds (sliding-window layers stay
    dense), then greedy argmax, all on the device with static shapes, so for a graph-safe method
    (dense, SparQ) the whole step is captured once as a CUDA graph and replayed.
Dense and SparQ run in this same loop, so a speed-up measured here is SparQ's own.
"""

from __future__ import annotations

import math

import copy
import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..config import SparQConfig
from ..caches.static import KernelCacheLayer
from ..kernels.plans import PlanCache
from ..methods import DecodeInputs, DecodeMethod, Dense
from ..methods.registry import as_method
from .attention import dense_attention, softcapped_decode
from .families import Family, family_for
from .window import WindowCache

_DENSE = Dense()  # what sliding-window layers run, whatever the method


@dataclass
class DecodeTimings:
    prefill_s: float
    decode_s: float
    steps: int

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / self.steps if self.steps else float("nan")


@dataclass
class Snapshot:
    """The decode state `FastDecoder.snapshot` saves: buffers, and each layer's method state."""

    tensors: list[Tensor]
    states: list[dict[str, Any]]
    sketch_fresh: bool = True


def _observes_prefill(method: DecodeMethod) -> bool:
    return type(method).observe_prefill is not DecodeMethod.observe_prefill


def static_method(method: DecodeMethod | SparQConfig) -> DecodeMethod:
    """The method as the fast loop runs it (a bare SparQConfig is SparQ); a ValueError naming a
    method without a static-cache path."""
    method = as_method(method)
    if not method.static_cache:
        raise ValueError(f"{method.name} has no static-cache path, so the fast loop cannot run it; "
                         f"use sparq.enabled(model, method) with model.generate")
    return method


class FastDecoder:
    """Greedy batched decoding of a supported model (see `families`) with any `DecodeMethod` that
    has a static-cache path (or a SparQConfig, for SparQ)."""

    def __init__(self, model: nn.Module, method: DecodeMethod | SparQConfig, *, batch: int, max_len: int,
                 prefill_chunk: int = 4096, keep_key_t: bool | None = None,
                 keep_sketch: tuple[int, int] | None = None, compile: bool | None = None,
                 fuse_weights: bool = True, tp_group=None, keep_logits: bool = False) -> None:
        method = static_method(method)
        if batch < 1 or max_len < 2:
            raise ValueError(f"batch must be >= 1 and max_len >= 2, got {batch}, {max_len}")
        family = family_for(model)  # a ValueError naming the model and the supported families
        # tensor parallelism: transformers' tp_plan (DTensor weights: each rank holds its heads and
        # MLP columns) or an explicit tp_group for a model that holds one rank's slices already.
        # Either way this rank runs attention over its own heads and cache; the row-parallel
        # projections (o_proj, down_proj) are summed over the ranks.
        if tp_group is None:
            tp_group = next((p.device_mesh.get_group() for p in model.parameters() if isinstance(p, DTensor)), None)
        self.tp_group = tp_group
        self._reduce = None if tp_group is None else functools.partial(_all_reduce, group=tp_group)
        self.family = family(model, max_len=max_len, fuse_weights=fuse_weights, reduce=self._reduce)
        _check_runs(self.family, method)  # before any work: the family's layout facts come from its config
        self.model = model
        self.method = self._requested = method
        self.batch, self.max_len, self.prefill_chunk = batch, max_len, prefill_chunk
        self.head_dim, self.scale = self.family.head_dim, self.family.scale
        self.num_q_heads, self.num_kv_heads = self.family.num_q_heads, self.family.num_kv_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Kᵀ only where a method reads it; build with keep_key_t=True to switch to one later.
        keep_key_t = method.needs_key_t if keep_key_t is None else keep_key_t
        # the packed key sketch only for a sketch-scored method (or keep_sketch=(bits, block) to switch)
        sketch_spec = method.sketch_spec if keep_sketch is None else keep_sketch
        self.cache: list[KernelCacheLayer | WindowCache] = []
        for i in range(len(self.family.layers)):
            w = self.family.window(i)
            self.cache.append(
                WindowCache(batch, self.num_kv_heads, min(w, max_len), self.head_dim, self.dtype, self.device)
                if w is not None else
                KernelCacheLayer(batch, self.num_kv_heads, self.head_dim, max_len, self.dtype, self.device,
                                 keep_key_t=keep_key_t, sketch_spec=sketch_spec))
        self._global = [c for c in self.cache if isinstance(c, KernelCacheLayer)]
        self.softcap = self.family.softcap  # soft-capped attention (Gemma 2): every layer dense, capped
        self.family.weights  # the per-layer weights (fused, with fuse_weights) now, not on the first step
        self._sketch_fresh = True  # the kept sketch covers every cached position (see _note_sketch_use)
        # the kernels' launch plans: owned by the decoder with its cache, planned once for the fixed
        # capacity, one workspace shared by every layer (one layer runs at a time)
        self.plans = PlanCache(growth=False)
        self._windows = [c for c in self.cache if isinstance(c, WindowCache)]
        # what a stateful method (H2O) keeps per layer between steps, as on the HF path
        self._states: list[dict[str, Any]] = [{} for _ in self.cache]
        self._observed: DecodeMethod | None = None  # the method that saw the last prefill
        # one lengths tensor for all layers (they advance together): advanced once per step, before
        # the layers; each layer appends at the previous lengths (_write_pos)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        for c in self._global:
            c.lengths = self.lengths
        self._write_pos = torch.zeros_like(self.lengths)
        self._positions_row = torch.arange(max_len, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        # keep_logits: the last step's (and the prefill's) next-token logits [B, vocab] float32 stay in
        # `self.logits` (one buffer, allocated by the first prefill), for a caller that picks the next
        # tokens itself (logits processors, sampling: `sparq.hf_generate`) and writes them to self.tokens
        self.keep_logits = keep_logits
        self.logits: Tensor | None = None
        self._graphs: dict[DecodeMethod, torch.cuda.CUDAGraph] = {}  # switching back costs no capture
        if compile is None:
            compile = self.device.type == "cuda"
        if compile:
            # one compiled graph per (batch, model shape): allow more than dynamo's default 8
            cfg_ = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg_, name):
                    setattr(cfg_, name, max(getattr(cfg_, name), 64))
        pre, post = self.family.pre_attention, self.family.post_attention
        self._pre = torch.compile(pre, fullgraph=True, dynamic=False) if compile else pre
        self._post = torch.compile(post, fullgraph=True, dynamic=False) if compile else post

    @property
    def _graph(self) -> "torch.cuda.CUDAGraph | None":
        """The captured step of the current method, if any."""
        return self._graphs.get(self.method)

    def _graphed(self, use_graph: bool) -> bool:
        # a sketch method is graph-safe only on the kernels, i.e. where the cache keeps its sketch
        on_kernels = self.method.sketch_spec is None or bool(
            self._global and self._global[0].sketch is not None and self._global[0].sketch.kernels)
        return (use_graph and self.device.type == "cuda" and self.method.graph_safe_for(self.dtype, self.head_dim)
                and on_kernels)

    def use(self, method: DecodeMethod | SparQConfig) -> None:
        """Switch the decode method (same cache; a graph-safe method's CUDA graph is captured on its
        first step)."""
        method = static_method(method)
        _check_runs(self.family, method)
        if method.needs_key_t and self._global and self._global[0].key_t is None:
            raise ValueError(f"{method.name} reads the transposed key copy, which this cache does not keep: "
                             f"build the decoder with keep_key_t=True")
        have = self._global[0].derived.sketch_spec if self._global else None
        if method.sketch_spec is not None and method.sketch_spec != have:
            raise ValueError(f"{method.label} scores with a {method.sketch_spec[0]}-bit sketch in blocks of "
                             f"{method.sketch_spec[1]}, which this cache does not keep (it keeps {have}): build the "
                             f"decoder with keep_sketch={method.sketch_spec}")
        if _observes_prefill(method) and self._observed not in (None, method):
            raise ValueError(f"{method.name} records the prefill's attention, and the last prefill ran under "
                             f"{self._observed.name}: use({method.name}) before the prefill")
        self.method = method

    def autotune(self, methods=None, steps: int = 4) -> dict:
        """Time `steps` decode steps of each method from the current state (after a prefill),
        restore the state and keep the fastest; returns {method: seconds per step}.

        SparQ's kernels have a fixed cost per layer that dense attention does not, so below some
        batch x context (about 64k tokens for the Llama-3-8B shape on an H100) dense is faster;
        measuring on the actual device and shape is the simplest policy that never loses to dense
        by more than the timing noise. Default candidates: dense and the current method."""
        methods = [static_method(m) for m in (methods if methods is not None else [_DENSE, self.method])]
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

    def _buffers(self) -> list[Tensor]:
        # positions past a row's length are scratch in a KernelCacheLayer; a ring's slots are not
        # (a sketch's codes are state: a block finished after the snapshot re-codes earlier positions)
        return ([self.lengths, self.positions, self.tokens] + [c.value_sum for c in self._global]
                + [t for c in self._windows for t in (c.key, c.value)]
                + [t for c in self._global if c.sketch is not None for t in (c.sketch.codes, c.sketch.lo, c.sketch.hi)])

    def snapshot(self) -> Snapshot:
        """The decode state (lengths, V sums, windows, positions, next tokens, method state)."""
        return Snapshot([t.clone() for t in self._buffers()], copy.deepcopy(self._states), self._sketch_fresh)

    def restore(self, snap: Snapshot) -> None:
        for dst, src in zip(self._buffers(), snap.tensors):
            dst.copy_(src)
        for dst, src in zip(self._states, snap.states):
            dst.clear()
            dst.update(copy.deepcopy(src))
        self._sketch_fresh = snap.sketch_fresh

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
        fam = self.family
        for st in self._states:
            st.clear()
        self._observed = self.method
        last_hidden = torch.zeros(B, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
        for start in range(0, L, self.prefill_chunk):
            end = min(L, start + self.prefill_chunk)
            ids = input_ids[:, start:end].to(self.device)
            pos = torch.arange(start, end, device=self.device).expand(B, -1)
            x = fam.embed(ids)
            ropes = fam.rotary(x, pos)
            # causal over the whole prefix: query i (absolute start+i) sees keys j <= start+i
            mask = torch.arange(end, device=self.device)[None, :] <= pos[0][:, None]
            valid = torch.arange(end, device=self.device)[None, :] < lengths[:, None]  # [B, end]
            for (pre, post), c, (cos, sin), st in zip(fam.weights, self.cache, ropes, self._states):
                q, k, v = fam.pre_attention(x, cos, sin, **pre)
                if isinstance(c, WindowCache):
                    out = c.prefill_attend(q, k, v, start, lengths, self.scale, self.softcap)
                else:
                    c.write_prefill(k, v, start, lengths)
                    key, value = c.key[:, :, :end], c.value[:, :, :end]
                    out = dense_attention(q, key, value, mask, self.scale, self.softcap)
                    if _observes_prefill(self.method):  # H2O's column sums: this chunk's queries
                        self.method.observe_prefill(q, key, value, valid, self.scale, st)
                x = fam.post_attention(x, out.transpose(1, 2).reshape(B, end - start, -1), **post)
            # keep the hidden state of each row's last real token
            inside = (lengths - 1 >= start) & (lengths - 1 < end)
            idx = (lengths - 1 - start).clamp(0, end - start - 1)
            picked = x[torch.arange(B, device=self.device), idx]
            last_hidden = torch.where(inside[:, None], picked, last_hidden)
        self.lengths.copy_(lengths)
        self.positions.copy_(lengths)
        for c in self._global:  # what needs the whole prompt (the sketch's per-block ranges)
            c.finish_prefill()
        self._sketch_fresh = True
        logits = fam.logits(last_hidden)
        if self.keep_logits:
            if self.logits is None:  # allocated once: a captured step writes this same buffer
                with torch.inference_mode(False):
                    self.logits = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            self.logits.copy_(logits)
        first = logits.argmax(-1)
        self.tokens.copy_(first)
        return first

    # ---- decode ----------------------------------------------------------------------------------

    def _step(self) -> None:
        """Feed self.tokens at self.positions; leave the next greedy tokens in self.tokens."""
        fam = self.family
        x = fam.embed(self.tokens[:, None])  # [B, 1, hidden]
        ropes = fam.rotary(x, self.positions[:, None])  # once per kind of layer
        self._write_pos.copy_(self.lengths)
        self.lengths.add_((self.lengths < self.max_len).to(self.lengths.dtype))
        valid = self._positions_row[None, :] < self.lengths[:, None]  # [B, max_len], shared by the layers
        for (pre, post), c, (cos, sin), st in zip(fam.weights, self.cache, ropes, self._states):
            q, k, v = self._pre(x, cos, sin, **pre)
            if isinstance(c, WindowCache):
                c.append(k, v, self._write_pos)
                inputs, method = c.inputs(q[:, :, 0], self.lengths, self.scale), _DENSE
            else:
                c.append(k, v, positions=self._write_pos, advance=False, sketch=self.method.sketch_spec is not None)
                inputs = DecodeInputs(q[:, :, 0], c.key, c.value, valid, self.scale, key_t=c.key_t,
                                      value_sum=c.value_sum, state=st, lengths=self.lengths, plans=self.plans,
                                      sketch=c.sketch)
                method = self.method
            out = softcapped_decode(inputs, self.softcap) if self.softcap else method.attend(inputs)
            x = self._post(x, out.reshape(self.batch, 1, -1), **post)
        logits = fam.logits(x)[:, 0]
        if self.logits is not None:
            self.logits.copy_(logits)
        self.tokens.copy_(logits.argmax(-1))
        self.positions.add_(1)

    @torch.inference_mode()
    def _note_sketch_use(self) -> None:
        """Only a sketch method's steps extend the kept sketch (others skip that launch); a sketch
        method after steps of another one rebuilds it from the K buffer once."""
        if self.method.sketch_spec is None:
            self._sketch_fresh = False
        elif not self._sketch_fresh:
            for c in self._global:
                c.finish_prefill()
            self._sketch_fresh = True

    def step(self, use_graph: bool = True) -> Tensor:
        """One decode step (replays a captured CUDA graph on CUDA for a graph-safe method); returns
        the new tokens [B]."""
        self._note_sketch_use()
        if self._graphed(use_graph):
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
        if self._graphed(use_graph) and self._graph is None:
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
            self.autotune([_DENSE, self._requested])
        rest, decode_s = self.decode(max_new_tokens - 1, use_graph)
        return torch.cat([first[:, None], rest], 1), DecodeTimings(prefill_s, decode_s, max_new_tokens - 1)


def _check_runs(family: Family, method: DecodeMethod) -> None:
    """A ValueError where `method` would run on no layer of the model, so the loop would silently
    decode dense under its name: every layer soft-caps its attention logits (Gemma 2; no method
    implements soft-capping), or every layer attends within a sliding window shorter than the cache
    (Mistral, Phi-3 with `sliding_window` < max_len; those layers stay dense)."""
    if isinstance(method, Dense):
        return
    model = f"{type(family.model).__name__} ({family.name})"
    if family.softcap:
        raise ValueError(f"{model} soft-caps its attention logits (attn_logit_softcapping={family.softcap:g}) on every "
                         f"layer, which {method.name} does not implement: the fast loop runs it with Dense() only")
    if all(family.window(i) is not None for i in range(len(family.layers))):
        raise ValueError(f"every layer of {model} attends within a sliding window ({family.window(0)}) shorter than "
                         f"max_len={family.max_len}; those layers stay dense, so {method.name} would run on none: "
                         f"use Dense(), or max_len <= the window")


def _all_reduce(t: Tensor, group) -> Tensor:
    """Sum over the tensor-parallel ranks (a functional collective: traceable by torch.compile and
    capturable in a CUDA graph with NCCL)."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(t, "sum", group)


def kv_bytes_per_token(model_config, *, sparq: bool = False, sketch: tuple[int, int] | None = None,
                       dtype_bytes: int = 2) -> int:
    """Cache bytes one more cached token costs, summed over the global-attention layers: K and V,
    plus an fp16/bf16 Kᵀ for the paper's step 1 (`sparq`), or plus a packed key sketch of
    `sketch = (bits, block)`: d * bits / 8 bytes of codes and 2 * d * dtype_bytes / block of ranges
    per KV head. Sliding-window layers (transformers' `layer_types`) are not counted: their ring
    holds a fixed window whatever the context."""
    c = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    types = getattr(c, "layer_types", None)
    windowed = bool(getattr(c, "sliding_window", None)) and types is not None
    layers = sum(t != "sliding_attention" for t in types) if windowed else c.num_hidden_layers
    per_head = 2 * head_dim * dtype_bytes
    if sparq:
        per_head += head_dim * dtype_bytes
    if sketch is not None:
        bits, block = sketch
        per_head += head_dim * bits / 8 + 2 * head_dim * dtype_bytes / block
    return math.ceil(per_head * kv_heads * layers)


def left_align(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """A tokenizer's padded batch (left- or right-padded; attention_mask 1 on real tokens) as the
    decoder takes it: ids [B, longest] with each row's tokens first, and lengths [B], on the CPU."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    lengths = attention_mask.sum(-1).cpu()
    if int(lengths.min()) < 1:
        raise ValueError("every row needs at least one prompt token")
    aligned = torch.zeros_like(input_ids).cpu()
    for b in range(input_ids.shape[0]):
        aligned[b, :lengths[b]] = input_ids[b][attention_mask[b].bool()].cpu()
    return aligned[:, :int(lengths.max())], lengths


@torch.inference_mode()
def fast_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                  method: DecodeMethod | SparQConfig, max_new_tokens: int, *, autotune: bool = False,
                  eos_token_id: int | None = None, **decoder_kwargs) -> tuple[Tensor, DecodeTimings]:
    """Greedy generation through `FastDecoder` from a tokenizer's batch (left- or right-padded
    input_ids with their attention_mask); returns new tokens [B, max_new_tokens] (after a row's
    eos_token_id, its tokens are eos) and the timings. autotune: see `FastDecoder.generate`."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    aligned, lengths = left_align(input_ids, attention_mask)
    max_len = int(lengths.max()) + max_new_tokens
    dec = FastDecoder(model, method, batch=input_ids.shape[0], max_len=max_len, **decoder_kwargs)
    tokens, timings = dec.generate(aligned, lengths, max_new_tokens, autotune=autotune)
    if eos_token_id is not None:
        done = (tokens == eos_token_id).int().cumsum(1) > 0
        done = torch.cat([torch.zeros_like(done[:, :1]), done[:, :-1]], 1)
        tokens = tokens.masked_fill(done, eos_token_id)
    return tokens, timings
