"""SparQ decode inside transformers' continuous batching (`model.generate_batch`,
`ContinuousBatchingManager`) over its paged KV cache. See docs/SERVING.md.

transformers' continuous batching (CB) packs every request of a step into one sequence: query
[1, Hq, Q, d] holds the new tokens of all requests back to back (a prefill chunk, or one token for a
decode request), `cu_seq_lens_q` / `cu_seq_lens_k` cut it into requests, and the paged cache's
`update(...)` writes the new keys/values to their pages (`write_index`) and returns each request's
whole keys/values read through its pages (`read_index`), packed the same way: [K, Hkv, d]. The
attention function is chosen by name from transformers' `AttentionInterface`; CB keeps any name that
starts with "paged|" (transformers 5.17 and 5.18; 5.19 changed this, see `check_version`).

This module registers "paged|sparq" there. Per layer and step it
  * writes the new K/V through the cache exactly as transformers' "paged|sdpa" does (and reads the
    packed copy back), except in a decode-only batch on the kernels route (`READ_PAGES`): there
    `cache.update` is given an empty read index, so it only writes, and the kernels read K/V
    through the pages (`_layer_pages`, the batch's slot map = `read_index`);
  * runs dense attention for the prefill tokens (a request with more than one new token), each
    prefill request over its own keys (`_own_keys_attention`: causal, lower-right for a chunk after
    cached keys), where "paged|sdpa" runs one SDPA over the whole packed batch under a block-diagonal
    [Q, K] mask (the same outputs; 10-40x less attention work per layer beside long decode requests);
  * for every decode request (one new token) runs the module's `DecodeMethod` (`sparq.enable` set it;
    the default method otherwise) on that request's keys/values: for the default method on CUDA
    fp16/bf16, on the Triton kernels (`_decode_kernels`) reading the packed read in place, or the
    pages through the slot map; else gathered from the packed read into [B, Hkv, S, d] with ragged
    lengths (`_decode`, PyTorch).
For a method that scores with a key sketch (the default method), the sketch is kept beside the paged
cache (`caches.paged.PagedSketch`: codes per physical page, ranges per finished block, written once
when a block finishes, read through the request's pages; shared prefix blocks share it).
What it does NOT do yet (stated in docs/SERVING.md): a batch with a prefill chunk, and the PyTorch
route, still read transformers' own packed gather of every request's pages (`cache.update`, as dense
"paged|sdpa" does); the kernels route adds a gather of the decode requests' packed sketch codes
(1/8 of K at 2 bits), the PyTorch route a copy of their K and V (and the sketch unpacked to fp32). It
syncs with the host once per forward pass (the request boundaries), so transformers cannot capture
the whole pass in a CUDA graph; instead, in a decode-only batch through the pages, each layer's step
(the step sketch and every kernel launch) replays a CUDA graph of its own (`GRAPHS`, `_Graphed`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import repeat_kv  # what transformers' "paged|sdpa" uses

from .caches.paged import PagedSketch, StepBuffers, _KeptSketch, step_state
from .methods import DecodeInputs, DecodeMethod, Dense
from .methods.sketch import SparQSketch

PAGED_ATTN_NAME = "paged|sparq"
# transformers versions whose continuous batching accepts a registered "paged|<name>" attention
# function and calls it with (cache, read_index, write_index, cu_seq_lens_q, cu_seq_lens_k) as this
# module expects. 5.19 made CB accept only "paged|eager", "sdpa" and flash implementations.
SUPPORTED_VERSIONS = ("5.17", "5.18")
# Upper bound on the transient fp32 copy of K and V that one chunk of decode requests gathers
# (bytes); decode requests are processed in chunks below it so the gather cannot exhaust memory.
GATHER_BYTES = 1 << 30
# The default method's decode requests on the Triton kernels (`_decode_kernels`): True (default) or
# None = wherever the kernels run (CUDA fp16/bf16, and Triton's CPU interpreter, where it is tested;
# on the H200 since 2026-11-30's fourth session); False: always the PyTorch path (tests compare the two).
KERNELS: bool | None = True
# Decode-only batches on the kernels route read K/V through the pages (`_layer_pages`): the new tokens
# are written with transformers' own update, told to read nothing back, and the kernels read the rows
# they need at their physical slots. True (default) or None: wherever the kernels route runs (on the
# H200 since 2026-11-30: tests/test_serving.py::test_kernels_route_on_the_gpu gives the packed read's
# tokens; `sparq bench serve` ran 3904 such layer calls); False: these batches read transformers' packed
# gather of every request's K/V, as every other batch does (tests compare the two).
READ_PAGES: bool | None = True
# Decode-only batches read through the pages (`READ_PAGES`) replay one CUDA graph per layer for the default
# method's step (`_Graphed`: the step sketch and every kernel launch of `DecodePlan.run`, captured once per
# batch bucket and plan), so a layer costs the host two copies and a replay instead of ~20 launches.
# True (default) or None: on CUDA where the route reads the pages; False: eager launches (tests compare);
# "static": the graphs' fixed-address layout run eagerly, no capture (how the CPU tests check the layout).
GRAPHS: bool | None | str = True
GRAPH_EVENTS: dict[str, int] = {"captured": 0, "replayed": 0}  # layer graphs, over the process's life (tests)
# Layer calls with decode requests by route, over the process's life (bench serve reports them).
# "pages": those of the kernels calls that read K/V through the pages (READ_PAGES), no packed read.
# "dense": those of an untagged layer or the Dense method (PyTorch, `_decode`; "torch" counts the other methods).
# "graphs": those of the "pages" calls that replayed (or captured) a CUDA graph (`GRAPHS`).
DECODE_CALLS: dict[str, int] = {"kernels": 0, "torch": 0, "pages": 0, "dense": 0, "graphs": 0}
# Smallest position capacity of a kernels plan (it doubles from there as requests grow).
MIN_CAPACITY = 128


def _version() -> str:
    import transformers

    return transformers.__version__


def cb_supported(version: str | None = None) -> bool:
    """Whether this transformers version's continuous batching can run "paged|sparq"."""
    v = _version() if version is None else version
    return ".".join(v.split(".")[:2]) in SUPPORTED_VERSIONS


def check_version(version: str | None = None) -> None:
    """RuntimeError naming the installed transformers when its continuous batching cannot run SparQ."""
    v = _version() if version is None else version
    if not cb_supported(v):
        wanted = " or ".join(s + ".x" for s in SUPPORTED_VERSIONS)
        raise RuntimeError(
            f"sparq serving (continuous batching) needs transformers {wanted}; found {v}. "
            f"From 5.19 on, transformers' continuous batching accepts only 'paged|eager', 'sdpa' and flash attention "
            f"implementations and refuses any registered function, so SparQ cannot run there without patching "
            f"transformers (docs/SERVING.md)")


@dataclass
class _Plan:
    """What every layer of one forward pass shares: the batch's request boundaries (read once from
    the device) and the tensors built from them. Keyed on the identity of `cu_seq_lens_q`: CB makes
    new kwargs tensors for every step and passes the same ones to every layer."""

    cu_q: Tensor  # the kwargs tensor this plan was made from (held so its id cannot be reused)
    cu_k: Tensor
    total_k: int
    prefill: bool           # some request has more than one new token: dense attention runs
    rows: list[int]         # the decode requests
    q_pos: Tensor           # [Bd] long: their query token in the packed batch
    k_start: list[int]      # where each one's keys begin in the packed read
    lengths: list[int]      # how many keys each one has (its whole context, the new token included)
    bounds: tuple[list[int], list[int]] = ([], [])  # cu_seq_lens_q/k on the host (every request)
    finished: dict[int, tuple[Tensor, bool]] = field(default_factory=dict)  # per sketch block size: see _finished
    kernel_rows: dict[tuple[int, str], tuple[Tensor, ...]] = field(default_factory=dict)  # see _kernel_rows
    sketch_index: dict[str, Any] = field(default_factory=dict)  # caches.paged.step_state's, for every layer


_LAST_PLAN: list[_Plan] = []  # one slot: the current forward pass's plan


def _plan(cu_q: Tensor, cu_k: Tensor, k_len: int, device: torch.device) -> _Plan:
    if _LAST_PLAN and _LAST_PLAN[0].cu_q is cu_q and _LAST_PLAN[0].cu_k is cu_k and _LAST_PLAN[0].total_k == k_len:
        return _LAST_PLAN[0]
    # One host sync per forward pass (not per layer): the boundaries decide shapes and which
    # requests decode. A kernel path reading the block table would take them on the device.
    bq, bk = cu_q.tolist(), cu_k.tolist()
    n_req = len(bq) - 1
    len_q = [bq[i + 1] - bq[i] for i in range(n_req)]
    len_k = [bk[i + 1] - bk[i] for i in range(n_req)]
    rows = [i for i in range(n_req) if len_q[i] == 1 and len_k[i] >= 1]
    prefill = any(n > 1 for n in len_q)
    plan = _Plan(cu_q=cu_q, cu_k=cu_k, total_k=k_len, prefill=prefill, rows=rows,
                 q_pos=torch.tensor([bq[i] for i in rows], dtype=torch.long, device=device),
                 k_start=[bk[i] for i in rows], lengths=[len_k[i] for i in rows], bounds=(bq, bk))
    _LAST_PLAN[:] = [plan]
    return plan


def _own_keys_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, plan: _Plan,
                        dropout: float, scaling: float | None) -> Tensor:
    """Dense causal attention of each prefill request over its own keys only: query [1, Hq, Q, d]; key,
    value [K, Hkv, d] packed like the queries (request r's keys are rows bk[r]:bk[r+1], its new tokens
    the last n_q of them). Returns [1, Q, Hq, d]; the rows of decode requests (the decode path writes
    them) and of padding tokens are zero.

    transformers' "paged|sdpa" gets the same rows from one SDPA over the whole packed batch under a
    [Q, K] block-diagonal causal mask: Q x K scores, most of them masked (every other request's keys),
    and a Q x K mask built first. Here a chunk costs n_q x n_k and needs no mask: lower-right causal
    (`causal_lower_right`, which PyTorch's flash kernel takes as is), or plain causal for a whole
    prompt. Measured per layer on an H200 (benchmarks/prefill_attention.py,
    prefill-attention-NVIDIA_H200-20261201T062510Z.json): 50 -> 1.3 ms for an 8k first chunk beside 8
    decode requests of 12k, 52 -> 5.5 ms for the last 8k chunk of a 16k prompt. (Decode requests are
    not done this way: one small SDPA per request and layer made dense's decode-only pass 2x slower
    than transformers' packed one in `sparq bench serve`, serve-...20261201T064414Z.json.)"""
    bq, bk = plan.bounds
    groups = getattr(module, "num_key_value_groups", 1)
    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    for r in range(len(bq) - 1):
        n_q, n_k = bq[r + 1] - bq[r], bk[r + 1] - bk[r]
        if n_q <= 1:  # a decode request: the method's path
            continue
        q = query[:, :, bq[r]: bq[r + 1]].contiguous()
        k = repeat_kv(key[bk[r]: bk[r + 1]].transpose(0, 1).unsqueeze(0), groups).contiguous()
        v = repeat_kv(value[bk[r]: bk[r + 1]].transpose(0, 1).unsqueeze(0), groups).contiguous()
        whole = n_q == n_k  # a whole prompt (no cached prefix): the plain causal mask
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if whole else causal_lower_right(n_q, n_k), dropout_p=dropout, scale=scaling,
            is_causal=whole)
        out[0, bq[r]: bq[r + 1]] = y[0].transpose(0, 1)
    return out


def _decode(method: DecodeMethod, query: Tensor, key: Tensor, value: Tensor, plan: _Plan, scale: float,
            sketch: PagedSketch | None = None, slots: Tensor | None = None) -> Tensor:
    """The method over each decode request's own keys/values: [Bd, Hq, d]. Requests are gathered
    from the packed read into [b, Hkv, S, d] (S = the chunk's longest context, valid = a prefix of
    lengths[b] positions), in chunks whose fp32 copy stays under GATHER_BYTES."""
    _, hkv, d = key.shape
    q = query[0].index_select(1, plan.q_pos).transpose(0, 1)  # [Bd, Hq, d]
    outs: list[Tensor] = []
    per_pos = (2 if sketch is None else 3) * hkv * d * 4  # K and V (and the dequantised sketch), fp32
    i = 0
    n = len(plan.rows)
    while i < n:
        j = i + 1
        while j < n and (j + 1 - i) * max(plan.lengths[i:j + 1]) * per_pos <= GATHER_BYTES:
            j += 1
        s = max(plan.lengths[i:j])
        lengths = torch.tensor(plan.lengths[i:j], dtype=torch.int32, device=key.device)
        starts = torch.tensor(plan.k_start[i:j], dtype=torch.long, device=key.device)
        offs = torch.arange(s, device=key.device)
        valid = offs[None, :] < lengths[:, None]  # [b, S]
        idx = torch.where(valid, starts[:, None] + offs[None, :], torch.zeros_like(offs)[None, :])
        k = key[idx].permute(0, 2, 1, 3).contiguous()  # [b, Hkv, S, d]
        v = value[idx].permute(0, 2, 1, 3).contiguous()
        x = DecodeInputs(query=q[i:j].contiguous(), key=k, value=v, valid=valid, scale=scale, lengths=lengths)
        if sketch is not None and slots is not None:  # step 1 from the kept sketch, read through the pages
            deq = sketch.dequantised(k, slots[idx], lengths)
            if deq is not None:  # else a block's sketch is unknown: the method derives it from the keys
                x.sketch = _KeptSketch(deq, sketch.bits, sketch.block)
        outs.append(method.attend(x))
        i = j
    return torch.cat(outs, 0)


@dataclass
class _Route:
    """What the kernels route keeps per paged cache, reused by every layer (one runs at a time) and
    step: the decode plans, one per batch capacity (a power of two) and replaced by one of twice
    the position capacity when outgrown, and the buffers of the step sketch."""

    plans: dict[tuple, Any] = field(default_factory=dict)
    bufs: StepBuffers = field(default_factory=StepBuffers)
    graphed: dict[int, "_Graphed"] = field(default_factory=dict)  # per batch bucket (`GRAPHS`)
    created: int = 0  # plans made (tests watch it)
    runs: int = 0     # decode calls that ran on the kernels (tests watch it)
    tuning: Any = None  # the plans' dispatch.Tuning (None: DEFAULT_TUNING; tests force small samples)

    def plan(self, batch: int, hq: int, hkv: int, d: int, length: int, config: Any, dtype: torch.dtype,
             device: torch.device) -> Any:
        from .kernels.dispatch import DEFAULT_TUNING, DecodePlan

        ident = (batch, hq, hkv, d, config, dtype, device)
        p = self.plans.get(ident)
        if p is None or p.capacity < length:
            cap = max(MIN_CAPACITY, config.block, 1 << max(0, length - 1).bit_length())
            p = self.plans[ident] = DecodePlan(batch, hq, hkv, d, cap, config, device, dtype,
                                               self.tuning or DEFAULT_TUNING)
            self.created += 1
        return p


_ROUTES: WeakKeyDictionary = WeakKeyDictionary()
_CONFIGS: dict[tuple, Any] = {}  # (method, head_dim) -> its kernels' SketchConfig (methods are frozen: hashable)


def _kernels_for(method: DecodeMethod, query: Tensor, key: Tensor, sketch: PagedSketch | None,
                 may_run: bool | None = None) -> bool:
    """Whether this layer's decode requests run on the kernels: the default method (`sparq-sketch`)
    with a kept sketch in the kernels' word layout, whose (bits, block, head_dim, dtype, device) the
    sketch kernels support (CUDA fp16/bf16; the CPU interpreter with fp16/fp32, for tests). The
    paper's `sparq` scores from Kᵀ, which the paged cache does not keep: it stays on PyTorch, as
    does every other method."""
    return (sketch is not None and sketch.words and (sketch.bits, sketch.block) == getattr(method, "sketch_spec", None)
            and (_kernels_may_run(method, query, key) if may_run is None else may_run))


_MAY_RUN: dict[tuple, bool] = {}  # _kernels_may_run's answers: asked once per layer and step


def _kernels_may_run(method: DecodeMethod | None, query: Tensor, key: Tensor) -> bool:
    """`_kernels_for` before the kept sketch is known (whether it is kept is decided later)."""
    on = KERNELS is not False
    if not (on and isinstance(method, SparQSketch) and query.dtype == key.dtype and key.stride(-1) == 1):
        return False
    from .kernels import available, interpreting
    from .kernels.sketch_state import sketch_supported

    bits, block = method.sketch_spec
    ident = (bits, block, key.shape[-1], key.dtype, key.device, interpreting())
    if ident not in _MAY_RUN:
        _MAY_RUN[ident] = bool(PagedSketch.word_layout(key.shape[-1], bits) and available(key.device)
                               and sketch_supported(key.shape[-1], bits, block, key.dtype, key.device))
    return _MAY_RUN[ident]


def _read_pages() -> bool:
    """`READ_PAGES` resolved (None: on, as True)."""
    return READ_PAGES is not False


def _layer_pages(cache: Any, layer_idx: int) -> tuple[Tensor, Tensor] | None:
    """The layer's whole paged K and V as [num_slots, Hkv, d] views whose rows are the physical slots
    that read_index / write_index hold (no copy), or None where this transformers keeps them
    otherwise. 5.18: the allocator's per-layer page views (`get_cache_for_block_table`, what its
    flash block-table path reads), [pages, page, Hkv, d] flattened; 5.17: one tensor per layer of a
    group (`key_cache[j]`, what its `update` indexes)."""
    if hasattr(cache, "get_cache_for_block_table"):
        _, k, v = cache.get_cache_for_block_table(layer_idx)
        return k.flatten(0, 1), v.flatten(0, 1)
    groups = getattr(cache, "layer_index_to_group_indices", None)
    if groups is not None and hasattr(cache, "key_cache"):
        _, j = groups[layer_idx]
        return cache.key_cache[j], cache.value_cache[j]
    return None


def _kernel_rows(plan: _Plan, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(starts, lengths) int32 [batch] of the decode requests padded to `batch` rows (padding rows: one
    key at offset 0, their output dropped), and the packed positions of the real rows' keys with the
    row of each (for value sums). Once per forward pass and batch size."""
    ident = (batch, str(device))
    if ident not in plan.kernel_rows:
        n = len(plan.rows)
        # int32, the kernels' type (DecodePlan.run would convert them in every layer: two launches each)
        starts = torch.tensor(plan.k_start + [0] * (batch - n), dtype=torch.int32, device=device)
        lengths = torch.tensor(plan.lengths + [1] * (batch - n), dtype=torch.int32, device=device)
        total = sum(plan.lengths)  # output sizes from the host: no device sync
        row = torch.repeat_interleave(torch.arange(n, device=device), lengths[:n], output_size=total)
        pos = starts[row] + torch.arange(total, device=device) - torch.repeat_interleave(
            torch.cumsum(lengths[:n], 0) - lengths[:n], lengths[:n], output_size=total)
        plan.kernel_rows[ident] = (starts, lengths, pos, row)
    return plan.kernel_rows[ident]


def _rows_view(t: Tensor, batch: int) -> Tensor:
    """[N, Hkv, d] (a packed read, or the whole paged cache) as [batch, Hkv, N, d] with batch stride 0:
    every row sees all of it, and the kernels read only their own rows (per-row starts or slots)."""
    return t.as_strided((batch, t.shape[1], t.shape[0], t.shape[2]), (0, t.stride(1), t.stride(0), t.stride(2)))


class _Graphed:
    """The default method's decode step through the pages as one CUDA graph per layer, for one batch bucket
    and decode plan (`GRAPHS`). A graph replays fixed addresses, so every per-pass input lives in buffers
    made once here: the rows' slot maps laid out at fixed offsets (row b's logical position p at
    slots[b * capacity + p], so starts = b * capacity never changes), their lengths, the query positions
    in the packed batch, the query and the output. Per pass `fill` writes them (three small copies) and
    replays a graph of `caches.paged.step_state`'s index tensors; per layer `run` copies the layer's
    decode queries in, replays the layer's graph (the step sketch's gathers and tail codes, then every
    launch of `DecodePlan.run`) and returns the output rows. A layer's graph is captured the first time
    it runs in this bucket, after an eager run (which gives that call's output and compiles the kernels).

    Capacity-sized where the eager route is length-sized: the stored codes and ranges are gathered for the
    plan's whole capacity (positions past a row's length are read from slot 0 and never scored), which
    is what lets one graph serve every pass until the plan is outgrown. Costs per bucket: the slot map
    (batch * capacity ints), the step sketch (batch * Hkv * capacity * d * bits / 8 bytes, and ranges) and
    the graphs' temporaries in the bucket's pool. Not used with reallocation (V's sums come from
    the pass's variable-length rows) or a tainted sketch (its check reads the device)."""

    def __init__(self, dplan: Any, batch: int, hq: int, d: int, blk: int, dtype: torch.dtype,
                 slot_dtype: torch.dtype, device: torch.device, capture: bool) -> None:
        cap = dplan.capacity
        self.dplan, self.batch, self.capacity, self.block, self.capture = dplan, batch, cap, blk, capture
        # One memory pool for this bucket's graphs (they replay one at a time, on one stream, and keep no
        # temporary past their end). Its own: PyTorch frees a pool when its last graph dies, and a handle
        # shared across buckets would be captured into again after that (an allocator assert, seen on the
        # H200 when the only bucket's plan was outgrown).
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        i32 = dict(dtype=torch.int32, device=device)
        self.slots = torch.zeros(batch * cap, dtype=slot_dtype, device=device)
        self.starts = torch.arange(batch, **i32) * cap
        self.lengths = torch.ones(batch, **i32)
        self.q_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.query = torch.zeros(hq, batch, d, dtype=dtype, device=device)  # [Hq, B, d]: index_select's layout
        self.out = torch.zeros(batch, hq, d, dtype=dtype, device=device)
        self.bufs = StepBuffers()
        self.index: dict[str, Any] = {}
        self.index_graph: Any = None
        self.graphs: dict[int, tuple[Any, tuple]] = {}  # layer -> (graph, the addresses it read)
        self.filled: _Plan | None = None

    def fill(self, plan: _Plan, slots: Tensor, rows: tuple[Tensor, ...]) -> None:
        """Write this pass's rows into the buffers (once per pass) and make step_state's index tensors."""
        if self.filled is plan:
            return
        from .caches.paged import _step_index

        n = len(plan.rows)
        starts, lengths, pos, row = rows  # `_kernel_rows`: the packed positions of the real rows' keys
        # row r's position p (packed pos = starts[r] + p) goes to slots[r * capacity + p]
        self.slots.index_copy_(0, pos + row * self.capacity - starts.long()[row], slots[pos].to(self.slots.dtype))
        self.lengths.copy_(lengths)
        self.q_pos[:n] = plan.q_pos
        if n < self.batch:  # padding rows read the first token (a row left from a longer batch could be past Q)
            self.q_pos[n:] = 0
        ident = (self.batch, self.capacity, self.capacity, self.block)

        def make_index() -> None:
            self.index.update(_step_index(self.slots, self.slots, self.starts, self.lengths, self.capacity,
                                          self.capacity, self.block), ident=ident)

        if not self.capture:
            make_index()
        elif self.index_graph is None:
            make_index()  # warm-up; the capture then swaps in tensors of the graph's pool, filled by its replay
            self.index_graph = self._capture(make_index)
            if self.index_graph is None:  # capture failed: this bucket runs eagerly on what make_index made
                make_index()
            else:
                self.index_graph.replay()
        else:
            self.index_graph.replay()
        self.filled = plan

    def run(self, layer: int, query: Tensor, sk: PagedSketch, pages: tuple[Tensor, Tensor], scale: float,
            n: int) -> Tensor | None:
        """The layer's decode rows [n, Hq, d] (None where the step sketch cannot be built)."""
        torch.index_select(query[0], 1, self.q_pos, out=self.query)
        k, v = pages
        reads = (k.data_ptr(), v.data_ptr(), sk.codes.data_ptr(), sk.lo.data_ptr(), sk.hi.data_ptr(), float(scale))
        entry = self.graphs.get(layer)
        if entry is not None and entry[1] == reads:
            entry[0].replay()
            GRAPH_EVENTS["replayed"] += 1
            return self.out[:n]
        if not self._layer(k, v, sk, scale):
            return None
        if self.capture:
            graph = self._capture(lambda: self._layer(k, v, sk, scale))
            if graph is not None:
                self.graphs[layer] = (graph, reads)
                GRAPH_EVENTS["captured"] += 1
        return self.out[:n]

    def _layer(self, k: Tensor, v: Tensor, sk: PagedSketch, scale: float) -> bool:
        b, cap = self.batch, self.capacity
        state = step_state(sk, k, self.slots, self.starts, self.lengths, cap, cap, self.bufs, self.index, paged=True)
        if state is None:
            return False
        self.dplan.run(self.query.transpose(0, 1), _rows_view(k, b), _rows_view(v, b), self.lengths, scale=scale,
                       starts=self.starts, out=self.out, sketch=state, max_length=cap, slots=self.slots)
        return True

    def _capture(self, fn: Any) -> Any:
        """fn's launches as a CUDA graph (not run now), on a side stream that waits for the current one.
        capture_begin / capture_end directly: `torch.cuda.graph` would synchronize the device and empty
        the allocator's cache at every capture. None if the capture fails: the bucket then runs its
        fixed-address layout eagerly from here on (the caller already has this call's output), with a
        warning, rather than failing the batch's requests."""
        try:
            graph = torch.cuda.CUDAGraph()
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream(device=current.device)
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):
                    graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                    try:
                        fn()
                    finally:
                        graph.capture_end()
            finally:
                current.wait_stream(side)
        except Exception as e:  # noqa: BLE001 - any failure to capture: run eagerly, never fail the requests
            self.capture = False
            warnings.warn(f"sparq serving: capturing the decode step as a CUDA graph failed ({type(e).__name__}: "
                          f"{e}); this batch size runs it eagerly (sparq.serving.GRAPHS = False skips capturing)",
                          stacklevel=2)
            return None
        return graph


def _graphs_mode(device: torch.device, config: Any, sk: PagedSketch) -> str | None:
    """How the paged decode step runs here: "capture" (CUDA graphs), "static" (their layout, eager) or None."""
    if GRAPHS is False or config.reallocate or sk.tainted:
        return None
    if GRAPHS == "static":
        return "static"
    return "capture" if device.type == "cuda" else None


def _decode_kernels(method: DecodeMethod, query: Tensor, key: Tensor, value: Tensor, plan: _Plan, scale: float,
                    sketch: PagedSketch, slots: Tensor, route: _Route, paged: bool = False, layer: int = 0
                    ) -> Tensor | None:
    """The decode requests of the default method on the Triton kernels, reading K and V where the
    packed read put them: key/value [K, Hkv, d] viewed as [B, Hkv, K, d] with batch stride 0 and row
    b starting at its request's offset (the kernels' per-row starts), so nothing is copied but the
    step sketch (`caches.paged.step_state`, 1/8 of K at 2 bits) and, with reallocation, V's sums.
    paged: key/value are the layer's whole paged cache [num_slots, Hkv, d] (`_layer_pages`) and the
    kernels read row b's position p at slot slots[starts[b] + p] (no packed read exists).
    Returns [Bd, Hq, d], or None where the step sketch cannot be built (the PyTorch path runs)."""
    from .kernels.sketch_scores import SketchConfig

    n = len(plan.rows)
    _, hkv, d = key.shape
    hq = query.shape[1]
    batch = 1 << (n - 1).bit_length()  # a power of two: few plans however the batch varies
    longest = max(plan.lengths)
    config = _CONFIGS.get((method, d))
    if config is None:  # one per method and head_dim: a dataclass made per layer call costs host time
        config = _CONFIGS[(method, d)] = SketchConfig.from_method(method, d)  # type: ignore[arg-type]
    dplan = route.plan(batch, hq, hkv, d, longest, config, key.dtype, key.device)
    starts, lengths, pos, row = _kernel_rows(plan, batch, key.device)
    mode = _graphs_mode(key.device, config, sketch) if paged else None
    if mode is not None:
        g = route.graphed.get(batch)
        if g is None or g.dplan is not dplan:  # a new bucket, or its plan was outgrown: drop the old graphs
            g = route.graphed[batch] = _Graphed(dplan, batch, hq, d, sketch.block, query.dtype, slots.dtype,
                                                key.device, mode == "capture")
        g.fill(plan, slots, (starts, lengths, pos, row))
        y = g.run(layer, query, sketch, (key, value), scale, n)
        if y is not None:
            route.runs += 1
            DECODE_CALLS["graphs"] += 1
            return y
    state = step_state(sketch, key, slots, starts, lengths, longest, dplan.capacity, route.bufs, plan.sketch_index,
                       paged=paged)
    if state is None:
        return None
    q = route.bufs.view("query", (batch, hq, d), query.dtype, query.device)
    q[:n] = query[0].index_select(1, plan.q_pos).transpose(0, 1)
    if n < batch:
        q[n:] = 0
    # batch stride 0: every row is the whole packed read (or cache); the kernels only read their own rows
    k, v = _rows_view(key, batch), _rows_view(value, batch)
    value_sum = None
    if config.reallocate:  # sum of V per request (reads each request's V once; the default method has none)
        value_sum = torch.zeros(batch, hkv, d, dtype=torch.float32, device=key.device)
        value_sum.index_add_(0, row, value.index_select(0, slots[pos] if paged else pos).float())
    out = route.bufs.view("out", (batch, hq, d), query.dtype, query.device)
    dplan.run(q, k, v, lengths, scale=scale, value_sum=value_sum, starts=starts, out=out, sketch=state,
              max_length=longest, slots=slots if paged else None)
    route.runs += 1
    return out[:n]


def paged_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs: Any) -> tuple[Tensor, None]:
    """What transformers calls under "paged|sparq" inside continuous batching: query [1, Hq, Q, d],
    key/value [1, Hkv, Q, d] (the new tokens); returns ([1, Q, Hq, d], None)."""
    from transformers.generation.continuous_batching import PagedAttentionCache

    from . import hf

    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{PAGED_ATTN_NAME!r} reads the batch's request boundaries on the host once per forward, "
                           f"which a CUDA graph cannot capture: run continuous batching with use_cuda_graph=False "
                           f"(its default for non-flash attention)")
    if kwargs.get("softcap") is not None:
        raise ValueError("sparq does not support attention logit soft-capping (Gemma 2 style)")
    if kwargs.get("s_aux") is not None or hf._has_sinks(module):  # checked here too: a model may reach CB unchecked
        raise ValueError(f"{PAGED_ATTN_NAME!r}: {type(module).__name__} has learned attention sinks (s_aux), which "
                         f"sparq's methods and its own-keys prefill would ignore (the output would differ from dense)")
    if hf._stays_dense(module):
        raise ValueError(f"{PAGED_ATTN_NAME!r} does not support sliding-window layers yet ({type(module).__name__} "
                         f"layer {module.layer_idx}); serving runs full-attention models (docs/SERVING.md)")
    if getattr(module, hf._CTX_ATTR, None) is None and not getattr(module, hf._DEFAULTED, False):
        hf._adopt_default(module, query.shape[-1], kwargs)  # loaded with "paged|sparq", never passed to enable
    method: DecodeMethod | None = getattr(module, hf._METHOD_ATTR, None)
    if method is not None and type(method).observe_prefill is not DecodeMethod.observe_prefill:
        raise ValueError(f"{method.label} keeps per-request state from the prefill, which continuous batching does "
                         f"not give it; use a stateless method (sparq, sparq-sketch, quest, streaming, topk, dense)")

    cache = kwargs.pop("cache", None)
    if not isinstance(cache, PagedAttentionCache):
        raise ValueError(f"attn_implementation={PAGED_ATTN_NAME!r} runs only inside transformers' continuous batching "
                         f"(model.generate_batch / ContinuousBatchingManager), which passes its paged cache; got "
                         f"cache={type(cache).__name__}. For model.generate use sparq.enable "
                         f"(attn_implementation='sparq')")

    read, write = kwargs["read_index"], kwargs["write_index"]
    cu_k = kwargs["cu_seq_lens_k"]
    if isinstance(cu_k, dict):  # hybrid models pass one per layer type (sliding layers were refused above)
        cu_k = cu_k["full_attention"]
    pages = None  # the layer's whole paged K, V where the kernels read them through the pages
    may_run = _kernels_may_run(method, query, key)
    # (the kernels need the kept sketch: `_kept_sketch`'s conditions, checked again there)
    if (_read_pages() and KEEP_SKETCH and getattr(cache, "allow_block_sharing", False) and len(read) == 1
            and read[0].numel() and may_run):
        # the batch's boundaries (read once per forward pass) say whether it is decode-only
        plan = _plan(kwargs["cu_seq_lens_q"], cu_k, read[0].numel(), query.device)
        if not plan.prefill and plan.rows:
            pages = _layer_pages(cache, module.layer_idx)
    if pages is not None:
        # transformers' own write of the new K/V; an empty read index makes `update` skip its gather
        # of every request's K/V (both versions return the new states instead, unused here)
        cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, read_index=[read[0][:0]],
                     write_index=write)
        key, value = pages  # [num_slots, Hkv, d]
        n_k = read[0].numel()
    else:
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                                  read_index=read, write_index=write)  # [K, Hkv, d]
        n_k = key.shape[0]
    plan = _plan(kwargs["cu_seq_lens_q"], cu_k, n_k, query.device)
    head_dim = query.shape[-1]
    scale = scaling if scaling is not None else head_dim**-0.5

    if plan.prefill:
        out = _own_keys_attention(module, query, key, value, plan, dropout, scaling)
    else:  # decode-only batch: every token below is overwritten (padding tokens stay zero)
        out = query.new_zeros(1, query.shape[2], query.shape[1], head_dim)
    sketch, slots = _kept_sketch(cache, module.layer_idx, method, key, plan, kwargs, paged=pages is not None)
    if plan.rows:
        if method is None:  # an untagged layer: dense for decode tokens too
            method = Dense()
        y = None
        if sketch is not None and slots is not None and _kernels_for(method, query, key, sketch, may_run):
            y = _decode_kernels(method, query, key, value, plan, scale, sketch, slots,
                                _ROUTES.setdefault(cache, _Route()), paged=pages is not None, layer=module.layer_idx)
        DECODE_CALLS["kernels" if y is not None else "dense" if isinstance(method, Dense) else "torch"] += 1
        DECODE_CALLS["pages"] += int(y is not None and pages is not None)
        if y is None:
            if pages is not None:  # the kernels cannot run after all: the packed read transformers would make
                key, value = key.index_select(0, read[0]), value.index_select(0, read[0])
            y = _decode(method, query, key, value, plan, scale, sketch, slots)  # [Bd, Hq, d]
        out[0].index_copy_(0, plan.q_pos, y.to(out.dtype))
    return out, None


# The sketch kept beside each paged cache, per layer (`caches.paged.PagedSketch`); freed with the cache.
_SKETCHES: WeakKeyDictionary = WeakKeyDictionary()
KEEP_SKETCH = True  # False: the sketch method derives its sketch from the gathered keys every step
_warned_sketch: list[str] = []


def _finished(plan: _Plan, block: int, slots: Tensor) -> tuple[Tensor, bool]:
    """The sketch blocks this step finishes, [n, block] packed positions (a request whose keys grew from
    p to n finishes blocks p // block .. n // block - 1; blocks before p are either its own, written
    earlier, or shared prefix blocks written by their first owner), and whether every one of them is
    contiguous in the slot space. Once per forward pass and block size (one host sync)."""
    if block not in plan.finished:
        bq, bk = plan.bounds
        rows = []
        for r in range(len(bq) - 1):
            n_k, n_q = bk[r + 1] - bk[r], bq[r + 1] - bq[r]
            for b in range((n_k - n_q) // block, n_k // block):
                rows.append(bk[r] + b * block)
        start = torch.tensor(rows, dtype=torch.long, device=slots.device)
        idx = start[:, None] + torch.arange(block, device=slots.device)[None, :]
        sl = slots[idx]
        ok = True if not rows else bool(((sl.diff(dim=1) == 1).all() & (sl[:, 0] % block == 0).all()))
        plan.finished[block] = (idx, ok)
    return plan.finished[block]


def _kept_sketch(cache: Any, layer_idx: int, method: DecodeMethod | None, key: Tensor, plan: _Plan,
                 kwargs: dict[str, Any], paged: bool = False) -> tuple[PagedSketch | None, Tensor | None]:
    """The layer's kept sketch, updated with the blocks this step finishes, and the packed keys'
    physical slots; (None, None) where it is not kept (another method, KEEP_SKETCH off, block sharing
    off, several layer groups, or a sketch block that is not contiguous in the pages). key: the
    packed read [K, Hkv, d], or (paged) the layer's whole paged K, read at the slots."""
    spec = getattr(method, "sketch_spec", None)
    read, write = kwargs["read_index"], kwargs["write_index"]
    per_layer = _SKETCHES.get(cache, {})
    if spec is None or not KEEP_SKETCH:
        sk = per_layer.get(layer_idx)
        if sk is not None:  # keys written without keeping the sketch: those blocks' sketch is unknown now
            sk.invalidate(write[0])
        return None, None
    reason = None
    if not getattr(cache, "allow_block_sharing", False):
        reason = "block sharing is off (forks would copy finished blocks without their sketch)"
    elif len(read) != 1:
        reason = "the cache has several layer groups"
    if reason is None:
        slots = read[0][: plan.total_k] if read[0].numel() else write[0][: plan.total_k]
        idx, ok = _finished(plan, spec[1], slots)
        if not ok:
            reason = f"a {spec[1]}-token sketch block is not contiguous or not aligned in the cache's pages " \
                     f"(use a sketch block that divides the cache's block size)"
    if reason is not None:
        if per_layer.get(layer_idx) is not None:
            per_layer[layer_idx].invalidate(write[0])
        if reason not in _warned_sketch:
            _warned_sketch.append(reason)
            warnings.warn(f"sparq serving: the key sketch is derived from the keys every step, not kept: {reason}",
                          stacklevel=3)
        return None, None
    per_layer = _SKETCHES.setdefault(cache, {})
    sk = per_layer.get(layer_idx)
    if sk is None or (sk.bits, sk.block) != spec:  # a new sketch knows no block (all `known` False)
        pages = _layer_pages(cache, layer_idx)
        bq, bk = plan.bounds
        # Untainted only when made in a step whose every request starts here (no earlier keys): then
        # every block that finishes later is sketched as it finishes. A request with earlier keys may
        # read finished blocks this sketch never saw, so readers check `known` (a host sync per layer).
        fresh = all(bk[r + 1] - bk[r] == bq[r + 1] - bq[r] for r in range(len(bq) - 1))
        sk = per_layer[layer_idx] = PagedSketch(key.shape[1], key.shape[2], spec[0], spec[1], key.dtype, key.device,
                                                slots=pages[0].shape[0] if pages is not None else None,
                                                tainted=not fresh)
    # No invalidation here: a step that keeps the sketch writes keys only into blocks it finishes now
    # (written below) or leaves unfinished (never read as finished before the step that finishes them
    # writes them), so its writes cannot leave a finished block with a stale sketch.
    if idx.shape[0]:  # blocks this step finishes (a host-known count: most decode steps finish none)
        sk.write_blocks(key[slots[idx]] if paged else key[idx], slots[idx])
    return sk, slots


def register() -> None:
    """Register "paged|sparq" with transformers' attention registry (idempotent; `sparq.hf.register`
    calls it). No mask function is registered: continuous batching passes no mask to it (it builds
    masks only for "paged|eager"/"paged|sdpa"), and the function needs none (each prefill request
    attends causally over its own keys)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_ATTN_NAME, paged_attention_forward)


def use_paged(model: nn.Module) -> None:
    """Switch a model to "paged|sparq" for continuous batching (after `sparq.enable`, which chose the
    method). Needed only where flash attention is installed: transformers' CB otherwise replaces a
    non-paged implementation such as "sparq" with flash attention itself, and SparQ would not run.
    Raises RuntimeError for a transformers version whose CB cannot run it (`check_version`)."""
    check_version()
    register()
    model.set_attn_implementation(PAGED_ATTN_NAME)
