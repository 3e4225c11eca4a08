"""Launch plans of one SparQ decode step on the Triton kernels (no math here).

FlashInfer-style plan / run: `DecodePlan(batch, heads, head_dim, capacity, config, device, tuning)`
chooses the launch geometry and allocates every workspace once, for caches of up to `capacity`
positions; `plan.run(query, key, value, lengths, ...)` launches the step over any cache of at most
that many positions and is reused by every layer (one layer runs at a time on a stream). Whoever
owns the KV cache owns its plans (`PlanCache`), so workspaces are freed with the cache and their
number does not grow with the sequence: a static cache plans once for its fixed size, a growing
one (transformers' DynamicCache) plans for a capacity that doubles when outgrown and drops the
smaller plan. `tuning` is a value (`Tuning`), never a module global changed at run time.

`DecodePlan.run` launches:
  _query_prep_kernel + scorer kernel    step 1: dims/factors + logits + split softmax stats
  _sample_kernel                        k_b, local_b looked up by length in the plan's table, zeroed
                                        counters; logZ per query head; bracket of the selection threshold
                                        (from the sample step 1 copied: every stride-th logit)
  _emit_kernel                          one pass: sure winners + local window, bracket candidates
  _resolve_kernel                       exact winners inside the bracket
  _compact_kernel                       (deterministic only) the kept-index list in position order
  _gather_attention_kernel              split-K attention over kept rows + alpha (gather_attention)
  _combine_kernel                       merge splits, reallocation, output
A plan made for a `sketch_scores.SketchConfig` runs `sparq-sketch` instead: its budget table holds
the sketch method's k_b, local_b and `_sketch_scores_kernel` (step 1 from the layer's packed
`sketch_state.SketchState`, no Kᵀ) replaces the two step-1 launches; the rest is unchanged.
With `Tuning.pdl` every launch is a programmatic dependent launch (`pdl.py`, sm_90+): a kernel is
launched while its predecessor drains and waits for it on the device (measured no faster; off).
Everything has static shapes (sized from the plan's capacity); lengths (and the optional per-row
start offsets of a left-padded cache) stay device tensors, so the step has no host synchronisation
and can be captured in a CUDA graph.

Left padding (`starts`): row b's valid positions are [starts[b], starts[b] + lengths[b]) of the
key buffer. The selection works in logical positions 0..lengths[b]-1; only the two kernels that
read the cache (the step-1 scorer over Kᵀ and the gather over K, V) add starts[b] to the address.
A paged cache (`slots`, sketch plans): position p of row b is row slots[starts[b] + p] of the
cache; the same two kernels (the sketch scorer for its exact keys) read that row.

Tuning.deterministic (default True): the step is bitwise reproducible. The emit kernel writes a
keep bitmap and per-tile kept counts instead of appending kept positions at atomically reserved
(scheduling-dependent) offsets, the resolve kernel marks its winners there (ties at the threshold
go to the earliest positions, as in the reference) and `_compact_kernel` writes the kept-index list
in ascending position order, so the gather accumulates rows in a fixed order. Extra cost per step:
one launch, S / 8 bytes of bitmap written and read per KV head (plus 4 bytes per 1024-position
tile of counts), two integer atomics per winner resolved inside the bracket. False: the previous
order-dependent lists (the kept set among exact ties and fp32 rounding vary between runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from . import SUPPORTED_HEAD_DIMS, interpreting
from . import select as _select
from .approx_scores import score_transposed_keys
from .gather_attention import _combine_kernel, _gather_attention_kernel
from .plans import PlanCache
from .pdl import pdl_supported
from .sketch_scores import score_sketch
from .select import _compact_kernel, _emit_kernel, _resolve_kernel, _sample_kernel



def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@dataclass(frozen=True)
class Tuning:
    """Launch-geometry knobs of the decode step (None = the plan's own choice). A value: pass a
    changed copy (`DEFAULT_TUNING.with_(...)`) to a plan; benchmarks/kernel_check.py sweeps them."""

    blocks_per_sm: int = 4
    score_block: int | None = None
    score_warps: int = 4
    score_stages: int | None = None
    # software-pipelining stages of the sketch scorer (H200, sketch-sweep-...153850Z.json: 2 is 5% faster
    # than triton's default 3 over the whole step at MHA B8 64k and GQA B16 64k, 4 is 17% slower at GQA)
    sketch_stages: int | None = 2
    score_dot: bool = True
    score_blocks_per_sm: int | None = 32
    gather_block: int | None = None
    gather_warps: int = 4
    gather_blocks_per_sm: int | None = 32
    emit_block: int = 1024
    # per-thread register caps (ptx .maxnreg; 0: the compiler's choice; None: the plan's). The emit pass
    # is latency-bound on its loads (ncu) at 80 registers (6 blocks of 4 warps per SM); capped at 64 (8
    # blocks) for g <= 4, the sketch scorer at 72 for g = 2..4, d <= 128 (7 blocks). H200
    # (sketch-sweep-...233024Z.json, both caps): whole step -4% at GQA B8 32k and B1 128k, -1% at GQA
    # B16 64k; at g = 1 the scorer cap cost +2% (so MHA caps only the emit: -1%). The sm_90 builds
    # spill nothing inside the loops (emit g <= 3: nothing at all; g = 4: 2 spill instructions)
    emit_maxnreg: int | None = None
    sketch_maxnreg: int | None = None
    emit_warps: int = 4
    emit_blocks_per_sm: int | None = 16
    compact_tiles: int | None = None  # emit tiles per `_compact_kernel` program (None: the emit chunk's)
    select_warps: int | None = None
    samples: int | None = None      # sample size per KV head (None: select.selection_sizes)
    select_cap: int | None = None   # resolve kernel's register capacity (None: selection_sizes)
    select_tol: int | None = None
    # threshold searches of the selection: pivots per round (1 = bisection) and the cap on the keys
    # per thread of their [n, P] comparison tile (select.search_pivots). H100, whole step
    # (KERNEL_NOTES.md): 4 pivots beat bisection by 8-22% on GQA shapes and tie it on MHA; 8 pivots
    # are 0-4% slower than 4, 16 slower still
    search_pivots: int = 4
    search_budget: int | None = 64
    # ...but bisection above this many KV heads per SM (MHA B=64 S=4k 627 -> 552 us on H100)
    pivots_max_blocks_per_sm: int | None = 2
    # step 1 copies the selection's sample (every stride-th logit) to a compact buffer; False: the sample
    # kernel reads it in place (a 32-byte sector per 4-byte key, g of them per position); None: only for
    # g > 1 with the sketch scorer. H200 (sketch-sweep-...231335Z.json): the copy makes the sample kernel
    # 2-4x faster (GQA B16 64k 42.3 -> 11.7 us) but the sketch scorer ~4% slower (its store instructions:
    # 305 -> 326 us at MHA B8 64k); the whole step is 5% / 3% / 2% faster at GQA B16 64k / B8 32k / B1 32k,
    # 2-3% slower at MHA. The paper's scorer stores [16, 512] tiles (64 elements per thread): its step was
    # 6% slower with the copy at GQA B16 64k (sketch-...231801Z.json), so it reads the sample in place
    sample_copy: bool | None = None
    # the resolve reads each bracket candidate's key as the emit pass stored it; False: recomputes it
    # from the logits (g scattered 4-byte reads per candidate). H200 (same sweep): resolve 42.6 -> 18.0 us
    # at GQA B16 64k, 20.8 -> 13.3 at GQA B1 32k, 43.7 -> 31.8 at MHA B8 64k (whose emit pays ~11 us more)
    candidate_keys: bool = True
    # bitwise-reproducible step with the kept-index list in ascending position order (module doc)
    deterministic: bool = True
    # programmatic dependent launch of the step's kernels (pdl.py): each launches while the previous one
    # drains and waits for it on the device. None: on where supported (CUDA, sm_90+, Triton with the
    # launch option); True where unsupported raises ValueError. Off by default: H200, whole graphed step
    # (sketch-sweep-...20261201T014447Z.json), PDL on vs off: GQA B1 32k 59.5 vs 56.8 us, MHA B1 4k 44.8
    # vs 43.6, GQA B1 128k 93.2 vs 96.6, the large shapes within 1%
    pdl: bool | None = False
    # the resolve holds the bracket in the smallest register tile of CAP / 8, CAP / 2, CAP keys that fits
    # it (its search rounds compare every key of the tile with the pivots); False: always CAP
    resolve_fit_tile: bool = True

    def with_(self, **changes) -> "Tuning":
        return replace(self, **changes)


DEFAULT_TUNING = Tuning()


def _score_block(r: int, elt: int, interp: bool, tuning: Tuning) -> int:
    """Positions per step-1 tile: the [r_pad, block] tile of Kᵀ must fit shared memory (the
    H200/H100 limit is 227 KB; a 256 x 512 bf16 tile alone is 256 KB), so keep it <= 64 KB."""
    if interp:
        return 64
    if tuning.score_block:
        return tuning.score_block
    r_pad = max(16, triton.next_power_of_2(r))
    return max(64, min(512, (64 * 1024) // (r_pad * elt)))


class DecodePlan:
    """Launch geometry and workspaces of the SparQ step for caches of up to `capacity` positions.

    Workspace memory per KV head (fp32 unless noted): logits g * capacity, bracket candidates and
    their keys 2 * capacity (int32), the selection's sample g * capacity / stride, kept-index list
    k_max (int32), keep bitmap capacity / 8 bytes, split statistics and partial outputs
    (n_split * g * (d + 3)). About (4 g + 8.2) bytes per position.
    """

    def __init__(self, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, capacity: int,
                 config, device: torch.device | str, dtype: torch.dtype = torch.float16,
                 tuning: Tuning = DEFAULT_TUNING) -> None:
        device = torch.device(device)
        self.batch, self.num_q_heads, self.num_kv_heads, self.head_dim = batch, num_q_heads, num_kv_heads, head_dim
        self.capacity, self.config, self.device, self.tuning = capacity, config, device, tuning
        s_cap = capacity
        bh = batch * num_kv_heads
        g = num_q_heads // num_kv_heads
        self.g = g
        interp = interpreting()
        sm = _sm_count(device)
        self.r = min(int(config.r), head_dim)
        # step 1 / selection geometry: split the sequence so that ~target blocks exist
        self.block_s = _score_block(self.r, torch.finfo(dtype).bits // 8, interp, tuning)
        n_blocks = triton.cdiv(s_cap, self.block_s)
        target1 = (tuning.score_blocks_per_sm or tuning.blocks_per_sm) * sm
        want = max(1, min(n_blocks, triton.cdiv(target1, bh)))
        self.chunk1 = triton.cdiv(n_blocks, want) * self.block_s
        self.n_split1 = triton.cdiv(s_cap, self.chunk1)
        # emit geometry: bigger tiles than step 1 (one atomic per tile and list)
        self.emit_block = 64 if interp else tuning.emit_block
        want_e = self.n_split1
        if tuning.emit_blocks_per_sm:
            want_e = max(1, min(triton.cdiv(s_cap, self.emit_block),
                                triton.cdiv(tuning.emit_blocks_per_sm * sm, bh)))
        self.chunk_e = triton.cdiv(triton.cdiv(s_cap, want_e), self.emit_block) * self.emit_block
        self.n_split_e = triton.cdiv(s_cap, self.chunk_e)
        self.chunk_c = tuning.compact_tiles * self.emit_block if tuning.compact_tiles else self.chunk_e
        self.n_split_c = triton.cdiv(s_cap, self.chunk_c)
        # step 2 geometry over the kept-index list
        # (a sketch plan's k can drop by one as a block finishes: its bound is the max over lengths)
        self.k_max = max(1, config.k_bound(s_cap) if hasattr(config, "k_bound") else config.k_for(s_cap))
        self.block_n = 16 if interp else (tuning.gather_block or (32 if head_dim >= 256 else 64))
        n_blocks2 = triton.cdiv(self.k_max, self.block_n)
        target2 = (tuning.gather_blocks_per_sm or tuning.blocks_per_sm) * sm
        want2 = max(1, min(n_blocks2, triton.cdiv(target2, bh)))
        self.chunk2 = triton.cdiv(n_blocks2, want2) * self.block_n
        self.n_split2 = triton.cdiv(self.k_max, self.chunk2)

        # selection sizes from the budgets: the sample bracket must fit the resolve kernel's registers
        if tuning.samples or tuning.select_cap:  # forced sizes (tests, sweeps)
            sizes = _select.sample_sizes(s_cap, tuning.samples or 2048, tuning.select_cap or _select.BASE_CAP, 65535)
        else:
            sizes = _select.selection_sizes(s_cap, config)
        self.samples, self.sample_stride, self.cap, self.sample_tol = sizes
        # step 1 copies every 2^shift-th logit to a compact sample (0: the sample is read in place)
        copy = (g > 1 and hasattr(config, "k_bound")) if tuning.sample_copy is None else bool(tuning.sample_copy)
        self.sample_copy = copy and self.sample_stride > 1
        self.sample_shift = self.sample_stride.bit_length() - 1 if self.sample_copy else 0
        if tuning.select_tol is not None:
            self.sample_tol = tuning.select_tol
        self.deterministic = bool(tuning.deterministic)
        if self.deterministic and (self.emit_block < 32 or self.emit_block & (self.emit_block - 1)):
            raise ValueError("deterministic selection needs a power-of-2 emit_block >= 32")
        self.n_tiles = triton.cdiv(s_cap, self.emit_block)
        # per-kernel warps and search pivots (host decisions made once here, not per step)
        sel_warps = 4 if interp else (tuning.select_warps or (16 if g > 1 else 8))  # H100: 16 help g > 1
        self.sample_warps = sel_warps if interp else max(sel_warps, min(32, self.samples // 512))
        self.resolve_warps = sel_warps if interp else max(sel_warps, min(32, self.cap // 512))
        # the deterministic fallback rewrites the bitmap one resolve block per emit tile
        self.resolve_block = self.emit_block if self.deterministic else (64 if interp else 1024)
        pivots = (tuning.search_pivots, tuning.search_budget)
        if tuning.pivots_max_blocks_per_sm and bh > tuning.pivots_max_blocks_per_sm * sm:
            pivots = (1, pivots[1])  # enough heads to hide the search latency: bisection's fewer compares win
        self.sample_pivots = _select.search_pivots(self.samples, self.sample_warps, *pivots)
        self.resolve_pivots = _select.search_pivots(self.cap, self.resolve_warps, *pivots)
        self.resolve_pivots_mem = _select.search_pivots(self.resolve_block, self.resolve_warps, *pivots)
        self.use_dot = g > 1 or tuning.score_dot
        self.score_warps = 4 if interp else tuning.score_warps
        self.score_stages = None if interp else tuning.score_stages
        self.gather_warps = 4 if interp else tuning.gather_warps
        self.emit_warps = 4 if interp else tuning.emit_warps
        # compile options passed at launch (the interpreter takes none)
        for name in ("emit_maxnreg", "sketch_maxnreg"):
            cap = getattr(tuning, name)
            if cap is not None and cap != 0 and not 24 <= cap <= 255:
                raise ValueError(f"Tuning.{name} must be None (the plan's), 0 (no cap) or 24..255 registers, got {cap}")
        emit_cap = (64 if g <= 4 else 0) if tuning.emit_maxnreg is None else tuning.emit_maxnreg
        sketch_cap = (72 if 2 <= g <= 4 and head_dim <= 128 else 0) if tuning.sketch_maxnreg is None else tuning.sketch_maxnreg
        self.emit_opts = {"maxnreg": emit_cap} if emit_cap and not interp else {}
        self.sketch_opts = {"maxnreg": sketch_cap} if sketch_cap and not interp else {}
        can_pdl = pdl_supported(device)
        if tuning.pdl and not can_pdl:
            raise ValueError("Tuning.pdl=True needs a CUDA device of compute capability >= 9.0 and a Triton with "
                             "the launch_pdl option (not the interpreter); use None (where supported) or False")
        self.pdl = can_pdl if tuning.pdl is None else bool(tuning.pdl)
        self.launch_opts = {"launch_pdl": True} if self.pdl else {}

        f32 = dict(dtype=torch.float32, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        rows = batch * num_q_heads
        self.logits = torch.empty(bh, g, s_cap, **f32)
        self.split_m = torch.empty(bh, g, self.n_split1, **f32)
        self.split_l = torch.empty(bh, g, self.n_split1, **f32)
        self.counts = torch.zeros(bh, 2, **i32)  # zeroed each step: (kept, bracket candidates)
        self.logz = torch.empty(bh, g, **f32)
        self.k_b = torch.empty(batch, **i32)
        self.local_b = torch.empty(batch, **i32)
        # (k, local) for every length up to the capacity, built on the host with the config's own
        # float64 operations: 8 bytes per position of capacity
        table = config.budget_table(s_cap) if hasattr(config, "budget_table") else _select.budget_table(config, s_cap)
        self.budget_table = torch.from_numpy(table).to(device)
        self.dims = torch.empty(bh, self.r, **i32)
        self.q_sel = torch.empty(bh, g, self.r, **f32)
        self.fac = torch.empty(bh, g, **f32)
        self.state = torch.empty(bh, 2, dtype=torch.int64, device=device)  # (U_hi, U_lo)
        self.cand = torch.empty(bh, s_cap, **i32)
        self.cand_keys = torch.empty(bh, s_cap, **i32)  # each bracket candidate's key, beside its position
        # the selection's sample: every sample_stride-th logit, copied by step 1 (or the logits, read in place)
        self.sample_buf = (torch.empty(bh, g, triton.cdiv(s_cap, self.sample_stride), **f32) if self.sample_copy
                           else self.logits)
        self.idx = torch.zeros(bh, self.k_max, **i32)  # entries past k_b stay as they were
        det = self.deterministic
        self.bits = torch.empty(bh, self.n_tiles * self.emit_block // 32 if det else 1, **i32)
        self.tile_counts = torch.empty(bh, self.n_tiles if det else 1, **i32)
        self.part_m = torch.empty(rows, self.n_split2, **f32)
        self.part_l = torch.empty(rows, self.n_split2, **f32)
        self.part_a = torch.empty(rows, self.n_split2, **f32)
        self.part_acc = torch.empty(rows, self.n_split2, head_dim, **f32)

    @property
    def s_cap(self) -> int:
        return self.capacity

    def workspace_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def matches(self, query: torch.Tensor, key: torch.Tensor, config, max_length: int | None = None) -> bool:
        batch, hq, d = query.shape
        span = key.shape[2] if max_length is None else max_length
        return (batch == self.batch and hq == self.num_q_heads and key.shape[1] == self.num_kv_heads
                and d == self.head_dim and span <= self.capacity and config == self.config
                and query.device.type == self.device.type
                and (self.device.index is None or query.device.index in (None, self.device.index)))

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor | None = None,
            *, scale: float | None = None, key_t: torch.Tensor | None = None, value_sum: torch.Tensor | None = None,
            starts: torch.Tensor | None = None, out: torch.Tensor | None = None,
            sketch=None, max_length: int | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """One SparQ decode step. Same semantics as `sparq.reference.sparq_reference`.

        query [B, Hq, d]; key, value [B, Hkv, S, d] with S <= capacity (last dim contiguous);
        lengths int [B] on the device (None = all S valid): the valid positions of row b are
        [starts[b], starts[b] + lengths[b]) (starts None = 0). key_t [B, Hkv, d, >= S] (contiguous
        along S) and value_sum fp32 [B, Hkv, d] (sum of V over the valid positions) come from the
        cache; without key_t the step transposes K and without value_sum it sums V: both read the
        whole cache (correct, slow).

        A plan made for a `sketch_scores.SketchConfig` runs `sparq-sketch` (`SparQSketch.attend`'s
        semantics) instead: step 1 reads `sketch` (the layer's `sketch_state.SketchState`, required;
        key_t is not used) and the budgets are the sketch method's.

        max_length (with starts): the longest row's length, which the caller knows, when the K/V
        buffer is longer than any row -- a packed buffer of several requests viewed with batch
        stride 0 and starts = each request's offset (serving). The plan's capacity must then cover
        max_length, not key.shape[2]; the kernels only read [starts[b], starts[b] + lengths[b]).
        Pass value_sum with such a view (summing it here would read every row's whole buffer).

        slots (with starts and max_length; sketch plans only): a paged K/V. key, value are the
        whole paged cache [num_slots, Hkv, d] viewed as [B, Hkv, num_slots, d] with batch stride 0,
        and logical position p of row b is row slots[starts[b] + p] of it (slots int32/int64 [>= any
        starts[b] + lengths[b]]: the batch's packed positions -> physical slots). The two kernels that
        read K or V (the gather and the scorer's exact keys of rows shorter than one sketch block)
        read through it; nothing else changes. value_sum is then required with reallocation.
        """
        config = self.config
        batch, num_q_heads, head_dim = query.shape
        _, num_kv_heads, seq_len, _ = key.shape
        if max_length is not None and starts is None:
            raise ValueError("max_length is for a buffer read through per-row starts")
        if slots is not None and (starts is None or max_length is None or not hasattr(config, "k_bound")):
            raise ValueError("slots need starts, max_length and a sketch plan (the paper's step 1 reads Kᵀ, "
                             "which a paged cache does not keep)")
        if slots is not None and config.reallocate and value_sum is None:
            raise ValueError("pass value_sum with slots (summing V here would read the whole paged cache)")
        if not self.matches(query, key, config, max_length):
            raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} do not fit this plan "
                             f"(B={self.batch}, Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, "
                             f"d={self.head_dim}, capacity {self.capacity})")
        device = query.device
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        if lengths is None:
            lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
        lengths = lengths.to(torch.int32)
        if starts is not None:
            starts = starts.to(torch.int32)
        if key.stride(-1) != 1 or value.stride(-1) != 1:
            raise ValueError("key and value must be contiguous along head_dim")
        is_sketch = hasattr(config, "k_bound")
        if is_sketch and sketch is None:
            raise ValueError("a sketch plan needs the layer's SketchState (sketch=...)")
        if not is_sketch and key_t is None:
            key_t = key.transpose(-1, -2).contiguous()
        if config.reallocate and value_sum is None:
            pos = torch.arange(seq_len, device=device)[None, :]
            first = starts[:, None] if starts is not None else 0
            valid = (pos >= first) & (pos < first + lengths[:, None])
            value_sum = (value.float() * valid[:, None, :, None]).sum(2)
        query = query.contiguous()
        g = self.g
        bh = batch * num_kv_heads
        has_starts = starts is not None
        starts_arg = starts if has_starts else lengths  # any int32 [B] tensor; unread without HAS_STARTS

        if is_sketch:  # step 1 of sparq-sketch (sketch_scores.py)
            score_sketch(self, query, key, sketch, lengths, starts_arg, has_starts, scale,
                         seq_len if max_length is None else max_length, slots)
        else:  # step 1 of the paper
            score_transposed_keys(self, query, key_t, lengths, starts_arg, has_starts, scale)
        # step 2a
        g_pad = triton.next_power_of_2(g)
        s_cap = self.capacity
        _sample_kernel[(bh, 2)](
            self.sample_buf, self.logz, lengths, self.budget_table, self.k_b, self.local_b, self.counts, self.state,
            self.split_m, self.split_l,
            self.n_split1, num_kv_heads, self.sample_buf.shape[-1], 1 if self.sample_copy else self.sample_stride,
            G=g, G_PAD=g_pad, NS=self.samples, STRIDE=self.sample_stride,
            NS1_PAD=triton.next_power_of_2(self.n_split1), TOL=self.sample_tol,
            PIVOTS=self.sample_pivots, num_warps=self.sample_warps, PDL=self.pdl, **self.launch_opts,
        )
        _emit_kernel[(bh, self.n_split_e)](
            self.logits, self.logz, lengths, self.k_b, self.local_b, self.state, self.counts.view(torch.int64),
            self.idx, self.cand, self.cand_keys, self.bits, self.tile_counts, num_kv_heads, s_cap, self.k_max,
            self.n_tiles,
            G=g, G_PAD=g_pad, CHUNK=self.chunk_e, BLOCK_S=self.emit_block, DET=self.deterministic,
            num_warps=self.emit_warps, PDL=self.pdl, **self.emit_opts, **self.launch_opts,
        )
        _resolve_kernel[(bh,)](
            self.logits, self.logz, lengths, self.k_b, self.local_b, self.state, self.counts, self.idx, self.cand,
            self.cand_keys, self.bits, self.tile_counts, num_kv_heads, s_cap, self.k_max, self.n_tiles,
            G=g, G_PAD=g_pad, CAP=self.cap, BLOCK=self.resolve_block,
            PIVOTS=self.resolve_pivots, PIVOTS_MEM=self.resolve_pivots_mem,
            TILE=self.emit_block, DET=self.deterministic, CKEYS=bool(self.tuning.candidate_keys),
            FIT=bool(self.tuning.resolve_fit_tile),
            num_warps=self.resolve_warps, PDL=self.pdl, **self.launch_opts,
        )
        if self.deterministic:
            _compact_kernel[(bh, self.n_split_c)](
                lengths, self.bits, self.tile_counts, self.idx, num_kv_heads, self.k_max, self.n_tiles,
                CHUNK=self.chunk_c, TILE=self.emit_block, NT_PAD=triton.next_power_of_2(self.n_tiles),
                ASM=query.device.type == "cuda", num_warps=4, PDL=self.pdl, **self.launch_opts,
            )
        # step 2b + 3
        _gather_attention_kernel[(bh, self.n_split2)](
            query, key, value, self.idx, self.k_b, self.logits, self.logz, starts_arg,
            starts_arg if slots is None else slots, self.part_m, self.part_l, self.part_acc, self.part_a,
            key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
            num_kv_heads, s_cap, self.k_max, self.n_split2, float(scale),
            G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=head_dim, CHUNK=self.chunk2, BLOCK_N=self.block_n,
            REALLOC=bool(config.reallocate), HAS_STARTS=has_starts, HAS_SLOTS=slots is not None,
            num_warps=self.gather_warps, PDL=self.pdl, **self.launch_opts,
        )
        if out is None:
            out = torch.empty_like(query)
        _combine_kernel[(batch * num_q_heads,)](
            self.part_m, self.part_l, self.part_acc, self.part_a,
            value_sum if value_sum is not None else self.part_a, lengths, self.k_b, out,
            num_q_heads, self.n_split2,
            G=g, D=head_dim, NS_PAD=triton.next_power_of_2(self.n_split2),
            REALLOC=bool(config.reallocate), num_warps=4, PDL=self.pdl, **self.launch_opts,
        )
        return out


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Shapes/dtypes the kernels handle (others use the reference)."""
    return (query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and query.shape[-1] in SUPPORTED_HEAD_DIMS)


def sparq_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config,
                 lengths: torch.Tensor | None = None, *, scale: float | None = None,
                 key_t: torch.Tensor | None = None, value_sum: torch.Tensor | None = None,
                 starts: torch.Tensor | None = None, plans: PlanCache | None = None,
                 tuning: Tuning = DEFAULT_TUNING, out: torch.Tensor | None = None, sketch=None) -> torch.Tensor:
    """One SparQ decode step on the kernels (see `DecodePlan.run`), planned by `plans` (the cache's
    `PlanCache`) or, without one, by a plan made for this call alone (freed when it returns).
    config may be a `sketch_scores.SketchConfig` (then `sketch` is the layer's SketchState)."""
    plan = plans.get(query, key, config) if plans is not None else DecodePlan(
        query.shape[0], query.shape[1], key.shape[1], query.shape[2], key.shape[2], config, query.device,
        query.dtype, tuning)
    return plan.run(query, key, value, lengths, scale=scale, key_t=key_t, value_sum=value_sum,
                    starts=starts, out=out, sketch=sketch)
