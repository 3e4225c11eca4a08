"""Launch plan of one SparQ decode step on the Triton kernels (no math here).

`sparq_decode(query, key, key_t, value, value_sum, lengths, config, scale)` runs:
  _budgets_kernel                       k_b, local_b from lengths (float64), zero list counters
  scorer.score                          step 1: dims/factors + logits + split softmax stats
  _sample_kernel                        logZ per query head; bracket of the selection threshold
  _emit_kernel                          one pass: sure winners + local window, bracket candidates
  _resolve_kernel                       exact winners inside the bracket
  _compact_kernel                       (deterministic only) the kept-index list in position order
  _gather_attention_kernel              split-K attention over kept rows + alpha (gather_attention)
  _combine_kernel                       merge splits, reallocation, output
Everything has static shapes (sized from the cache capacity S = key.shape[2]); lengths stay a
device tensor, so the step has no host synchronisation and can be captured in a CUDA graph.
Workspaces are cached per (device, shapes, dtype, config) and reused across steps.

TUNING["deterministic"] (default True): the step is bitwise reproducible. The emit kernel writes a
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
from dataclasses import dataclass

import torch
import triton

from . import SUPPORTED_HEAD_DIMS, interpreting
from .approx_scores import TransposedKeyScorer
from .gather_attention import _combine_kernel, _gather_attention_kernel
from . import select as _select
from .select import _budgets_kernel, _compact_kernel, _emit_kernel, _resolve_kernel, _sample_kernel



def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@dataclass
class Workspace:
    """Scratch buffers and launch geometry for one (shape, dtype, config) decode step."""

    s_cap: int
    k_max: int
    g: int
    block_s: int
    chunk1: int
    n_split1: int
    score_warps: int
    score_stages: int | None
    emit_block: int
    chunk_e: int
    n_split_e: int
    block_n: int
    chunk2: int
    n_split2: int
    logits: torch.Tensor   # [BH, g, S] fp32
    split_m: torch.Tensor  # [BH, g, n_split1]
    split_l: torch.Tensor
    counts: torch.Tensor   # [BH, 2] int32, zeroed each step: (kept, bracket candidates)
    logz: torch.Tensor     # [BH, g] fp32
    k_b: torch.Tensor      # [B] int32
    local_b: torch.Tensor  # [B] int32
    fracs: torch.Tensor    # [2] fp64: (k_fraction, local_fraction)
    dims: torch.Tensor     # [BH, d] int32 (first r used)
    q_sel: torch.Tensor    # [BH, g, d] fp32 (first r used)
    fac: torch.Tensor      # [BH, g] fp32
    prep_in_torch: bool
    samples: int
    cap: int               # resolve kernel's register capacity (bracket candidates)
    sample_tol: int        # order-key tolerance of the sample bisection
    state: torch.Tensor    # [BH, 2] int64: (U_hi, U_lo)
    cand: torch.Tensor     # [BH, S] int32
    idx: torch.Tensor      # [BH, k_max] int32
    deterministic: bool    # TUNING["deterministic"]: bitmap + _compact_kernel (see the module docstring)
    n_tiles: int           # emit tiles per KV head: cdiv(S, emit_block)
    bits: torch.Tensor     # [BH, n_tiles * emit_block / 32] int32 keep bitmap (deterministic; else [1])
    tile_counts: torch.Tensor  # [BH, n_tiles] int32 kept positions per tile (deterministic; else [1])
    part_m: torch.Tensor   # [B*Hq, n_split2]
    part_l: torch.Tensor
    part_a: torch.Tensor
    part_acc: torch.Tensor  # [B*Hq, n_split2, d]


_WORKSPACES: dict = {}

# Launch geometry knobs (None = the default below); benchmarks/kernel_check.py sweeps them.
TUNING = dict(blocks_per_sm=4, score_block=None, score_warps=4, score_stages=None,
              gather_block=None, gather_warps=4, gather_blocks_per_sm=32, emit_block=1024,
              emit_warps=4, score_dot=True, select_warps=None, samples=None, emit_blocks_per_sm=16,
              score_blocks_per_sm=32, select_cap=None, select_tol=None,
              # threshold searches of the selection: pivots per round (1 = bisection) and the cap on
              # the keys per thread of their [n, P] comparison tile (select.search_pivots). H100,
              # whole step (benchmarks/results/pivots-H100.log): 4 pivots beat bisection by 8-22% on
              # GQA shapes (B=1 S=4k 82.6 -> 64.9 us, B=8 S=32k 183.7 -> 168.6, B=1 S=131072 197 -> 172)
              # and tie it on MHA; 8 pivots are 0-4% slower than 4, 16 slower still
              search_pivots=4, search_budget=64,
              # ...but bisection above this many KV heads per SM (MHA B=64 S=4k 627 -> 552 us,
              # B=32 S=16k 780 -> 743 with bisection; benchmarks/results/det-sweep-H100.log)
              pivots_max_blocks_per_sm=2,
              # bitwise-reproducible step with the kept-index list in ascending position order
              # (see the module docstring); False: the older atomic-order lists. H100: all 82 GPU
              # kernel tests pass on both paths, repeated decoder runs give equal tokens
              # (tp-smoke-H100-1gpu-deterministic.log), whole-step time within -8%..+4% of the
              # atomic path (det-sweep-H100.log)
              deterministic=True)


def plan(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, s_cap: int,
         config, device: torch.device) -> Workspace:
    key = (device, batch, num_q_heads, num_kv_heads, head_dim, s_cap, config, tuple(sorted(TUNING.items())),
           _select.SAMPLES, _select.CAP)
    ws = _WORKSPACES.get(key)
    if ws is not None:
        return ws
    bh = batch * num_kv_heads
    g = num_q_heads // num_kv_heads
    interp = interpreting()
    # step 1 / selection geometry: split the sequence so that ~target blocks exist
    block_s = 64 if interp else (TUNING["score_block"] or 512)
    n_blocks = triton.cdiv(s_cap, block_s)
    target1 = (TUNING["score_blocks_per_sm"] or TUNING["blocks_per_sm"]) * _sm_count(device)
    want = max(1, min(n_blocks, triton.cdiv(target1, bh)))
    chunk1 = triton.cdiv(n_blocks, want) * block_s
    n_split1 = triton.cdiv(s_cap, chunk1)
    # emit geometry: as many splits as step 1, bigger tiles (one atomic per tile and list)
    emit_block = 64 if interp else TUNING["emit_block"]
    want_e = n_split1
    if TUNING["emit_blocks_per_sm"]:
        want_e = max(1, min(triton.cdiv(s_cap, emit_block),
                            triton.cdiv(TUNING["emit_blocks_per_sm"] * _sm_count(device), bh)))
    chunk_e = triton.cdiv(triton.cdiv(s_cap, want_e), emit_block) * emit_block
    n_split_e = triton.cdiv(s_cap, chunk_e)
    # step 2 geometry over the kept-index list
    k_max = max(1, config.k_for(s_cap))
    block_n = 16 if interp else (TUNING["gather_block"] or (32 if head_dim >= 256 else 64))
    n_blocks2 = triton.cdiv(k_max, block_n)
    target2 = (TUNING["gather_blocks_per_sm"] or TUNING["blocks_per_sm"]) * _sm_count(device)
    want2 = max(1, min(n_blocks2, triton.cdiv(target2, bh)))
    chunk2 = triton.cdiv(n_blocks2, want2) * block_n
    n_split2 = triton.cdiv(k_max, chunk2)

    # selection sizes from the budgets: the sample bracket must fit the resolve kernel's registers
    samples, cap, sample_tol = _select.selection_sizes(s_cap, config)
    samples = TUNING["samples"] or samples
    cap = TUNING["select_cap"] or cap
    sample_tol = TUNING["select_tol"] if TUNING["select_tol"] is not None else sample_tol

    f32 = dict(dtype=torch.float32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    det = bool(TUNING.get("deterministic", False))
    if det and (emit_block < 32 or emit_block & (emit_block - 1)):
        raise ValueError("deterministic selection needs a power-of-2 emit_block >= 32")
    n_tiles = triton.cdiv(s_cap, emit_block)
    logits = torch.empty(bh, g, s_cap, **f32)
    rows = batch * num_q_heads
    ws = Workspace(
        s_cap=s_cap, k_max=k_max, g=g, block_s=block_s, chunk1=chunk1, n_split1=n_split1,
        score_warps=TUNING["score_warps"], score_stages=TUNING["score_stages"],
        emit_block=emit_block, chunk_e=chunk_e, n_split_e=n_split_e, block_n=block_n, chunk2=chunk2, n_split2=n_split2,
        logits=logits,
        split_m=torch.empty(bh, g, n_split1, **f32), split_l=torch.empty(bh, g, n_split1, **f32),
        counts=torch.zeros(bh, 2, **i32),
        logz=torch.empty(bh, g, **f32), k_b=torch.empty(batch, **i32), local_b=torch.empty(batch, **i32),
        fracs=torch.tensor([config.k_fraction, config.local_fraction], dtype=torch.float64, device=device),
        dims=torch.empty(bh, head_dim, **i32), q_sel=torch.empty(bh, g, head_dim, **f32),
        fac=torch.empty(bh, g, **f32), prep_in_torch=bool(TUNING.get("prep_in_torch", False)),
        samples=samples, cap=cap, sample_tol=sample_tol,
        state=torch.empty(bh, 2, dtype=torch.int64, device=device), cand=torch.empty(bh, s_cap, **i32),
        idx=torch.empty(bh, k_max, **i32),
        deterministic=det, n_tiles=n_tiles,
        bits=torch.empty(bh, n_tiles * emit_block // 32 if det else 1, **i32),
        tile_counts=torch.empty(bh, n_tiles if det else 1, **i32),
        part_m=torch.empty(rows, n_split2, **f32), part_l=torch.empty(rows, n_split2, **f32),
        part_a=torch.empty(rows, n_split2, **f32), part_acc=torch.empty(rows, n_split2, head_dim, **f32),
    )
    _WORKSPACES[key] = ws
    return ws


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Shapes/dtypes the kernels handle (others use the reference)."""
    return (query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and query.shape[-1] in SUPPORTED_HEAD_DIMS)


def sparq_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config,
    lengths: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    key_t: torch.Tensor | None = None,
    value_sum: torch.Tensor | None = None,
    scorer=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SparQ decode step on the kernels. Same semantics as `sparq.reference.sparq_reference`.

    query [B, Hq, d]; key, value [B, Hkv, S, d] (last dim contiguous); lengths int [B] on the
    device (None = all S valid); key_t [B, Hkv, d, S] (contiguous along S) and value_sum fp32
    [B, Hkv, d] (sum of V over the valid positions) come from `sparq.kernel_cache.SparQKernelCache`.
    Without key_t the step transposes K itself and without value_sum it sums V: both read the
    whole cache, so they are correct but slow. `scorer` replaces step 1 (see approx_scores).
    """
    batch, num_q_heads, head_dim = query.shape
    _, num_kv_heads, s_cap, _ = key.shape
    device = query.device
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if lengths is None:
        lengths = torch.full((batch,), s_cap, dtype=torch.int32, device=device)
    lengths = lengths.to(torch.int32)
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value must be contiguous along head_dim")
    ws = plan(batch, num_q_heads, num_kv_heads, head_dim, s_cap, config, device)
    g = ws.g
    bh = batch * num_kv_heads
    if scorer is None:
        if key_t is None:
            key_t = key.transpose(-1, -2).contiguous()
        scorer = TransposedKeyScorer(key_t, config.r, scale)
    if config.reallocate and value_sum is None:
        valid = torch.arange(s_cap, device=device)[None, :] < lengths[:, None]
        value_sum = (value.float() * valid[:, None, :, None]).sum(2)
    query = query.contiguous()

    k_b, local_b = ws.k_b, ws.local_b
    _budgets_kernel[(batch,)](
        lengths, ws.fracs, k_b, local_b, ws.counts, int(config.k), int(config.local_window), num_kv_heads,
        H2_PAD=triton.next_power_of_2(2 * num_kv_heads), num_warps=1,
    )

    # step 1
    scorer.score(query, lengths, ws)
    logz = ws.logz  # written by _sample_kernel from the split statistics

    # step 2a
    g_pad = triton.next_power_of_2(g)
    # measured on H100: 16 warps help the g > 1 selection (key gathers), 8 suit g = 1
    sel_warps = 4 if interpreting() else (TUNING["select_warps"] or (16 if g > 1 else 8))
    # the sample's keys live in registers: keep <= 32 of them per thread
    sample_warps = sel_warps if interpreting() else max(sel_warps, min(32, ws.samples // 512))
    resolve_warps = sel_warps if interpreting() else max(sel_warps, min(32, ws.cap // 512))
    resolve_block = 64 if interpreting() else 1024
    if ws.deterministic:  # the fallback rewrites the bitmap one resolve block per emit tile
        resolve_block = ws.emit_block
    pivots = (TUNING["search_pivots"], TUNING["search_budget"])
    if TUNING["pivots_max_blocks_per_sm"] and bh > TUNING["pivots_max_blocks_per_sm"] * _sm_count(device):
        pivots = (1, pivots[1])  # enough heads to hide the search latency: bisection's fewer compares win
    _sample_kernel[(bh, 2)](
        ws.logits, logz, lengths, k_b, local_b, ws.state, ws.split_m, ws.split_l, ws.n_split1,
        num_kv_heads, s_cap,
        G=g, G_PAD=g_pad, NS=ws.samples, NS1_PAD=triton.next_power_of_2(ws.n_split1), TOL=ws.sample_tol,
        PIVOTS=_select.search_pivots(ws.samples, sample_warps, *pivots), num_warps=sample_warps,
    )
    _emit_kernel[(bh, ws.n_split_e)](
        ws.logits, logz, lengths, k_b, local_b, ws.state, ws.counts.view(torch.int64), ws.idx, ws.cand,
        ws.bits, ws.tile_counts, num_kv_heads, s_cap, ws.k_max, ws.n_tiles,
        G=g, G_PAD=g_pad, CHUNK=ws.chunk_e, BLOCK_S=ws.emit_block, DET=ws.deterministic,
        num_warps=4 if interpreting() else TUNING["emit_warps"],
    )
    _resolve_kernel[(bh,)](
        ws.logits, logz, lengths, k_b, local_b, ws.state, ws.counts, ws.idx, ws.cand,
        ws.bits, ws.tile_counts, num_kv_heads, s_cap, ws.k_max, ws.n_tiles,
        G=g, G_PAD=g_pad, CAP=ws.cap, BLOCK=resolve_block,
        PIVOTS=_select.search_pivots(ws.cap, resolve_warps, *pivots),
        PIVOTS_MEM=_select.search_pivots(resolve_block, resolve_warps, *pivots),
        TILE=ws.emit_block, DET=ws.deterministic, num_warps=resolve_warps,
    )
    if ws.deterministic:
        _compact_kernel[(bh, ws.n_split_e)](
            lengths, ws.bits, ws.tile_counts, ws.idx, num_kv_heads, ws.k_max, ws.n_tiles,
            CHUNK=ws.chunk_e, TILE=ws.emit_block, NT_PAD=triton.next_power_of_2(ws.n_tiles), num_warps=4,
        )

    # step 2b + 3
    g_dot = max(16, triton.next_power_of_2(g))
    _gather_attention_kernel[(bh, ws.n_split2)](
        query, key, value, ws.idx, k_b, ws.logits, logz,
        ws.part_m, ws.part_l, ws.part_acc, ws.part_a,
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        num_kv_heads, s_cap, ws.k_max, ws.n_split2, float(scale),
        G=g, G_PAD=g_dot, D=head_dim, CHUNK=ws.chunk2, BLOCK_N=ws.block_n,
        REALLOC=bool(config.reallocate), num_warps=4 if interpreting() else TUNING["gather_warps"],
    )
    if out is None:
        out = torch.empty_like(query)
    _combine_kernel[(batch * num_q_heads,)](
        ws.part_m, ws.part_l, ws.part_acc, ws.part_a,
        value_sum if value_sum is not None else ws.part_a, lengths, k_b, out,
        num_q_heads, ws.n_split2,
        G=g, D=head_dim, NS_PAD=triton.next_power_of_2(ws.n_split2),
        REALLOC=bool(config.reallocate), num_warps=4,
    )
    return out
