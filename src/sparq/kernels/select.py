"""Step 2a of SparQ: which positions each KV head keeps, without a sort and without host syncs.

Per KV head the kept set is: the last `local_b` valid positions, plus the `need = k_b - local_b`
candidates (valid, not local: positions < length - local_b) with the largest selection key, or
every valid position when k_b >= length. The selection key is monotone in s_hat summed over the
group's query heads:
- g = 1: the approximate logit itself (softmax is monotone), read from step 1's output;
- g > 1: c(s) = sum_j exp(logit_j(s) - logZ_j), computed on the fly from step 1's logits.
Each fp32 key maps to an order-preserving unsigned 32-bit integer u (held in int64).

Threshold selection in three kernels (no sort, one full pass over the keys; DET adds a 4th, below):
1. `_sample_kernel` (one block per KV head): a systematic sample of the candidate keys, every
   STRIDE-th position (STRIDE a power of two fixed by the plan), read from a compact copy that
   step 1 writes beside the logits (the scorers' SMP_SHIFT; by default for g > 1 sketch plans,
   `dispatch.Tuning.sample_copy`) or else in place, a whole 32-byte sector per 4-byte key; sample
   order statistics (a search over u, counts by comparison, to tolerance TOL) bracket the need-th largest
   key: U_hi (surely above: ~4 sigma of the sample quantile) and U_lo. When the sample is the whole
   candidate set the bracket is exact (U_hi = U_lo = the need-th largest key).
2. `_emit_kernel` (split over the sequence): one pass over the keys; appends the local window and
   every candidate with u > U_hi to the index list, the candidates with U_lo <= u <= U_hi to a
   small candidate list (one atomic add per block and list), with each candidate's key beside it
   (int32, `_signed_key`), so that the resolve reads 4 contiguous bytes per candidate instead of
   g scattered logits (a 32-byte sector each) and does not recompute the g > 1 sums.
3. `_resolve_kernel` (one block per KV head): the exact remaining winners among the bracket's
   candidates (a search over u on the candidate keys held in registers; ties at the threshold
   are broken by candidate order, as any top-k may). If the bracket missed (too many above U_hi,
   or too few up to U_lo: possible only for adversarial key orders), it recomputes the selection
   exactly over all candidates from memory: slower, never wrong.
Only positions < length are read; the kept positions are appended in no particular order.

Deterministic variant (DET, dispatch.Tuning.deterministic, the default): atomically reserved
offsets make the list order depend on tile scheduling, hence which tied positions are kept and
the gather's fp32 summation order. With DET, `_emit_kernel` writes each tile's keep bitmap and kept
count instead of appending, `_resolve_kernel` marks its winners there (integer atomics: order
independent) and breaks ties at the threshold toward the EARLIEST positions like the reference
(a search over the tied candidates' positions, only when ties exceed the places left), and a 4th
kernel, `_compact_kernel`, writes the index list in ascending position order from an exclusive
scan of the tile counts. The candidate list keeps its atomic order: nothing derived from it
depends on that order any more.

The searches over u (the m-th largest key) are multi-pivot (`_kth_largest_mp`): each round counts
the keys above P evenly spaced pivots with ONE block reduction of the [n, P] comparison tile and
keeps the sub-interval holding the answer, so [lo, hi] shrinks (P + 1)-fold per round: an exact
search over 2^32 takes 11 rounds with P = 8 instead of 32, a bracket of 2^22 takes 7 instead of
22. Each round is one block-wide reduction (its latency dominates). Separate per-pivot reductions
(KERNEL_NOTES.md v5) were slower: they do not overlap. P = 1 is the plain bisection
(`_kth_largest`); P is chosen per kernel on the host (`search_pivots`, dispatch.Tuning).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .pdl import wait_for_previous

KEY_SPAN = tl.constexpr(4294967296)  # 2^32: above every key

# (samples, order-key tolerance of the sample bisection, resolve capacity CAP) tried in turn; the
# first whose predicted bracket (+3 sigma) fits CAP wins. `samples` is the sample kernel's register
# tile: the sample is every STRIDE-th candidate, STRIDE the smallest power of two that leaves at most
# `samples` positions of the capacity (so between samples / 2 and samples at full length).
# A tolerance of 65535 order-key steps saves
# 8 bisection rounds (2 rounds of the 8-pivot search) and widens the bracket only a little (not in
# predicted_bracket). Larger samples cost time (16384 samples:
# +34 us at GQA B=1 S=131072 k=S/16 on H100), so a larger CAP comes before a larger sample, except
# 8192 samples with CAP 4096 before 4096 with CAP 8192: the 8192-wide resolve is slow (whole step,
# GQA B=1 S=131072 k=S/16, H100: 135 vs 166 us; benchmarks/results/plan-sweep-H100.log).
_SAMPLE_PLANS = ((2048, 65535, 4096), (4096, 65535, 4096), (8192, 65535, 4096), (4096, 65535, 8192),
                 (8192, 255, 8192),
                 (16384, 255, 8192), (16384, 255, 16384))
BASE_CAP = 4096


class SampleSizes(NamedTuple):
    samples: int  # the sample kernel's register tile (a power of two >= ceil(capacity / stride))
    stride: int   # every stride-th candidate position is sampled (a power of two; 1: all of them)
    cap: int      # the resolve kernel's register capacity
    tol: int      # order-key tolerance of the sample's threshold search


def sample_stride(s_cap: int, samples: int) -> int:
    """The smallest power of two p with ceil(s_cap / p) <= samples."""
    p = 1
    while -(-s_cap // p) > samples:
        p *= 2
    return p


def sample_sizes(s_cap: int, samples: int, cap: int, tol: int) -> SampleSizes:
    stride = sample_stride(s_cap, samples)
    return SampleSizes(max(16, 1 << (-(-s_cap // stride) - 1).bit_length()), stride, cap, tol)


def predicted_bracket(length: int, config, stride: int) -> tuple[float, float]:
    """(mean, standard deviation) of the number of bracket candidates for a sequence of `length`
    valid positions, sampled every `stride`-th candidate: the sample ranks between U_hi and U_lo
    (~2 * margin + 1, see _sample_kernel; counted as 2 * margin + 3) scaled to the candidate count;
    the population between two sample order statistics has a relative spread of ~1/sqrt(ranks)."""
    k = config.k_for(length)
    lb = config.local_for(length)
    n_cand, need = length - lb, k - lb
    if k >= length or need <= 0:
        return 0.0, 0.0
    ns = -(-n_cand // stride)
    if ns == n_cand:
        return 1.0, 0.0  # exact bracket: only ties at the threshold
    t = need * ns / n_cand
    margin = 4.0 * math.sqrt(max(t * (1.0 - t / ns), 0.0)) + 2.0
    ranks = 2.0 * margin + 3.0
    return n_cand * ranks / ns, n_cand * math.sqrt(ranks) / ns


def selection_sizes(s_cap: int, config) -> SampleSizes:
    """Sample tile and stride, resolve capacity CAP, sample tolerance for caches of s_cap positions.

    The bracket must fit the resolve kernel's registers (CAP candidates) for every length up to
    s_cap, else the resolve kernel falls back to passes over the candidates in memory (one block
    per KV head; H100, GQA B=1 S=131072: 551 / 702 us per step at k = S/8 / S/4 with the old fixed
    4096 samples, 291 / 362 us with 16384 samples in registers). A larger sample is not free
    (16384 samples: +34 us at k = S/16, see KERNEL_NOTES.md v8), so _SAMPLE_PLANS tries a larger
    CAP (8192) before a larger sample. The plan needs each length's predicted bracket + 3 sigma
    to fit CAP.
    """
    lengths = sorted({max(1, s_cap >> i) for i in range(8)})
    for ns, tol, cap in _SAMPLE_PLANS:
        sizes = sample_sizes(s_cap, ns, cap, tol)
        if all(m + 3.0 * sd <= cap for m, sd in (predicted_bracket(n, config, sizes.stride) for n in lengths)):
            return sizes
    return sample_sizes(s_cap, _SAMPLE_PLANS[-1][0], _SAMPLE_PLANS[-1][2], _SAMPLE_PLANS[-1][1])


def search_pivots(n_keys: int, num_warps: int, pivots: int | None, budget: int | None) -> int:
    """Pivots per round (a power of 2; 1 = plain bisection) of the threshold search over n_keys
    keys held by one block of num_warps warps (see _kth_largest_mp).

    The [n_keys, P] comparison tile is spread over the block with each key repeated on the P
    lanes that hold different pivots, i.e. n_keys * P / (32 * num_warps) int32 keys per thread,
    held across the rounds. `budget` caps that (None: no cap): the pivots halve until it fits.
    Example (budget 64): the resolve at CAP 4096 and the sample at 4096 keys with 16 warps keep
    8 pivots, 8192 keys with 16 warps get 4, 16384 keys with 32 warps get 4.
    """
    if not pivots or pivots <= 1:
        return 1
    p = 1 << (int(pivots).bit_length() - 1)
    while budget and p > 1 and n_keys * p > budget * 32 * num_warps:
        p //= 2
    return p


def budgets(config, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_b and local_b per sequence (int32 [B]), on lengths' device, no host sync.

    Float64 math identical to SparQConfig.k_for / local_for:
    k_b = min(len, max(k, ceil(k_fraction * len))),
    local_b = min(k_b, max(local_window, round_half_even(local_fraction * k_b))).
    """
    n = lengths.to(torch.float64)
    k = torch.clamp(torch.ceil(config.k_fraction * n), min=float(config.k))
    k = torch.minimum(k, n)
    local = torch.clamp(torch.round(config.local_fraction * k), min=float(config.local_window))
    local = torch.minimum(local, k)
    return k.to(torch.int32), local.to(torch.int32)


def budget_table(config, capacity: int) -> np.ndarray:
    """int32 [capacity + 1, 2]: (k_for(n), local_for(n)) of a SparQConfig for every length n (row 0
    unused), with its own float64 operations (ceil of k_fraction * n, Python's round half to even)
    in numpy. A plan builds it once; `_budgets_kernel` looks budgets up in it. A table, not float64
    arithmetic on the device: on the H200 that arithmetic gave off-by-one budgets for some lengths
    (KERNEL_NOTES.md)."""
    n = np.arange(0, capacity + 1, dtype=np.float64)
    k = np.minimum(n, np.maximum(float(config.k), np.ceil(config.k_fraction * n)))
    local = np.minimum(k, np.maximum(float(config.local_window), np.round(config.local_fraction * k)))
    return np.stack([k, local], 1).astype(np.int32)


@triton.jit
def _budgets_of(table_ptr, length):
    """(k_b, local_b) of a sequence of `length` valid positions: row `length` of the plan's budget
    table (`budget_table`, or a sketch config's). Reads 8 bytes."""
    return tl.load(table_ptr + 2 * length), tl.load(table_ptr + 2 * length + 1)


@triton.jit
def _budgets_kernel(len_ptr, table_ptr, k_ptr, local_ptr, count_ptr, num_kv_heads, H2_PAD: tl.constexpr,
                    PDL: tl.constexpr = False):
    """k_b, local_b of sequence b looked up in the budget table, and zero its KV heads' list counters:
    what `_sample_kernel` does at its start in the decode step (one launch fewer); this kernel runs the
    lookup alone (tests). Reads 4 + 8 bytes, writes 8 + 8 * Hkv bytes."""
    wait_for_previous(PDL)
    b = tl.program_id(0)
    kb, lb = _budgets_of(table_ptr, tl.load(len_ptr + b))
    tl.store(k_ptr + b, kb)
    tl.store(local_ptr + b, lb)
    offs = tl.arange(0, H2_PAD)
    tl.store(count_ptr + b * num_kv_heads * 2 + offs, tl.zeros([H2_PAD], tl.int32), mask=offs < num_kv_heads * 2)


@triton.jit
def _order_key(v):
    """fp32 -> int64 in [0, 2^32), order preserving (-inf < ... < -0 <= +0 < ... < +inf)."""
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, (~bits).to(tl.int64), bits.to(tl.int64) + 2147483648)


@triton.jit
def _order_key32(v):
    """fp32 -> int32, order preserving: _order_key(v) - 2^31 (= _signed_key of it) in two integer
    operations, for passes that compare every key with a threshold (int32 compares, no int64)."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 2147483647)


@triton.jit
def _key_at(logits_ptr, logz_ptr, bh, pos, mask, s_cap, G: tl.constexpr, G_PAD: tl.constexpr):
    """Ordered selection key of positions `pos` of KV head `bh` (see the module docstring)."""
    if G == 1:
        v = tl.load(logits_ptr + bh.to(tl.int64) * s_cap + pos, mask=mask, other=0.0)
    else:
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < G
        logz = tl.load(logz_ptr + bh * G + offs_g, mask=g_ok, other=0.0)
        lg = tl.load(logits_ptr + (bh * G + offs_g).to(tl.int64)[:, None] * s_cap + pos[None, :],
                     mask=g_ok[:, None] & mask[None, :], other=float("-inf"))
        v = tl.sum(tl.exp(lg - logz[:, None]), axis=0)
    return _order_key(v)


@triton.jit
def _in_sample(s, ok, SHIFT: tl.constexpr):
    """Which positions s (where ok) belong to the selection's sample: every 2^SHIFT-th; entry s >> SHIFT
    of the scorers' compact copy (`DecodePlan.sample_buf`)."""
    return ok & ((s & ((1 << SHIFT) - 1)) == 0)


@triton.jit
def _popc(x, ASM: tl.constexpr):
    """Set bits of each int32 word (0..32, int32): one POPC on the GPU, a SWAR count elsewhere."""
    if ASM:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _ranks_in_words(words, ASM: tl.constexpr):
    """For words [NW] (bit i of word w = element 32 w + i of a tile): ([NW, 32] int32 bit of each
    element, [NW, 32] int32 number of set elements before it in the tile, [NW] int32 set elements per
    word). An exclusive scan over the tile from one NW-wide scan and a popcount of the lower lanes, in
    place of a scan over every element."""
    lane = tl.arange(0, 32)
    cnt = _popc(words, ASM)
    excl = tl.cumsum(cnt, 0) - cnt
    below = ((tl.full([32], 1, tl.uint32) << lane.to(tl.uint32)) - 1).to(tl.int32, bitcast=True)  # lanes < i
    bit = (words[:, None] >> lane[None, :]) & 1
    return bit, excl[:, None] + _popc(words[:, None] & below[None, :], ASM), cnt


@triton.jit
def _kth_largest(u, ok, j, lo, hi, tol):
    """Bisection for the j-th largest (0-based) v of u[ok] (max v with count(u >= v) >= j + 1),
    starting from lo <= v <= hi; stops once hi - lo <= tol and returns (lo, hi), so that
    lo <= v <= hi (exact with tol = 0)."""
    while hi - lo > tol:
        mid = (lo + hi + 1) // 2
        c = tl.sum((ok & (u >= mid)).to(tl.int32), 0)
        take = c >= j + 1
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    return lo, hi


@triton.jit
def _signed_key(u):
    """Order key (int64 in [0, 2^32)) -> int32, order preserving (u - 2^31): half the registers
    of the int64 key in the [n, P] comparison tile of the multi-pivot search."""
    return (u - 2147483648).to(tl.int32)


@triton.jit
def _pivots(lo, hi, P: tl.constexpr):
    """P pivots splitting [lo, hi] (hi > lo) into P + 1 parts of width < step: pivot i is
    lo + (i + 1) * step clamped to hi (never past 2^32 - 1), as int32 (see _signed_key); every
    pivot is >= lo + 1 >= 1."""
    step = (hi - lo) // (P + 1) + 1
    piv = tl.minimum(lo + (tl.arange(0, P) + 1).to(tl.int64) * step, hi)
    return _signed_key(piv), step


@triton.jit
def _narrow(lo, hi, step, cnt, j):
    """[lo, hi] after one multi-pivot round, cnt[i] = count(u >= pivot i) (one 2D reduction).
    Counts fall with the pivot, so the pivots with cnt >= j + 1 are the first n: v >= pivot n-1
    (lo + n * step, or hi when clamped) and v < pivot n (<= lo + (n + 1) * step)."""
    n = tl.sum((cnt >= j + 1).to(tl.int64), 0)
    new_lo = tl.minimum(lo + n * step, hi)
    return new_lo, tl.minimum(hi, lo + (n + 1) * step - 1)


@triton.jit
def _kth_largest_mp(u, ok, j, lo, hi, tol, P: tl.constexpr):
    """_kth_largest with P pivots per round (same contract: returns (lo, hi) with lo <= v <= hi,
    exact with tol = 0): the counts of all P pivots come from ONE reduction of the [n, P]
    comparison tile, and [lo, hi] shrinks (P + 1)-fold per round instead of 2-fold.
    P = 1 is the plain bisection."""
    if P == 1:
        lo, hi = _kth_largest(u, ok, j, lo, hi, tol)
    else:
        # masked keys become u = 0, below every pivot (>= 1): never counted
        k2 = _signed_key(tl.where(ok, u, 0))[:, None]
        while hi - lo > tol:
            piv, step = _pivots(lo, hi, P)
            cnt = tl.sum((k2 >= piv[None, :]).to(tl.int32), axis=0)
            lo, hi = _narrow(lo, hi, step, cnt, j)
    return lo, hi


@triton.jit
def _sample_kernel(
    smp_ptr, logz_ptr, len_ptr, table_ptr, k_ptr, local_ptr, count_ptr, state_ptr, split_m_ptr, split_l_ptr, n_split,
    num_kv_heads, n_smp, smp_step,
    G: tl.constexpr, G_PAD: tl.constexpr, NS: tl.constexpr, STRIDE: tl.constexpr, NS1_PAD: tl.constexpr,
    TOL: tl.constexpr, PIVOTS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The budgets (k_b, local_b looked up by length: written for the later kernels by the first KV
    head of each sequence) and zeroed list counters (count[bh]) of the step, log-normalisers of s_hat
    from step 1's split statistics, then the bracket [U_lo, U_hi] of
    the need-th largest key from a systematic sample: candidate positions 0, STRIDE, 2 STRIDE, ...,
    whose logits are entries 0, smp_step, 2 smp_step, ... of the rows of smp [BH, g, n_smp]: the
    compact copy step 1 wrote (smp_step 1), or the logits themselves (smp_step = STRIDE).

    Reads 8 * g * n_split bytes of statistics and up to NS keys per KV head (4 * g bytes each:
    contiguous from the copy, a 32-byte sector each in place); writes 4 * g bytes of logZ and 16
    bytes of state.
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    offs_gs = tl.arange(0, G_PAD)
    offs_p = tl.arange(0, NS1_PAD)
    st_ok = (offs_gs[:, None] < G) & (offs_p[None, :] < n_split)
    st = (bh * G + offs_gs)[:, None] * n_split + offs_p[None, :]
    sm = tl.load(split_m_ptr + st, mask=st_ok, other=float("-inf"))
    sl = tl.load(split_l_ptr + st, mask=st_ok, other=0.0)
    mx = tl.max(sm, axis=1)
    mx_safe = tl.where(mx > float("-inf"), mx, 0.0)
    lz = mx_safe + tl.log(tl.maximum(tl.sum(sl * tl.exp(sm - mx_safe[:, None]), axis=1), 1e-30))
    tl.store(logz_ptr + bh * G + offs_gs, lz, mask=offs_gs < G)
    tl.debug_barrier()  # logZ is read back below (g > 1 keys)
    b = bh // num_kv_heads
    length = tl.load(len_ptr + b)
    kb, lb = _budgets_of(table_ptr, length)
    n_cand = length - lb
    need = kb - lb
    which = tl.program_id(1)  # 0: U_hi, 1: U_lo (two blocks per KV head halve the latency)
    if which == 0:  # the step's budgets and list counters, read by the kernels after this one
        tl.store(count_ptr + bh * 2 + tl.arange(0, 2), tl.zeros([2], tl.int32))
        if bh % num_kv_heads == 0:
            tl.store(k_ptr + b, kb)
            tl.store(local_ptr + b, lb)
    val = tl.full([], 4294967296, tl.int64)
    if (kb < length) & (need > 0):
        ns = (n_cand + STRIDE - 1) // STRIDE  # <= NS: the plan sizes NS for its capacity
        i = tl.arange(0, NS)
        ok = i < ns
        u = _key_at(smp_ptr, logz_ptr, bh, i * smp_step, ok, n_smp, G, G_PAD)
        nsf = ns.to(tl.float32)
        t = need.to(tl.float32) * nsf / n_cand.to(tl.float32)
        margin = 4.0 * tl.sqrt(tl.maximum(t * (1.0 - t / nsf), 0.0)) + 2.0
        margin = tl.where(ns == n_cand, 0.0, margin)
        r_hi = tl.floor(t - margin).to(tl.int32) - 1
        r_lo = tl.ceil(t + margin).to(tl.int32) - 1
        # Inexact order statistics are enough: v_hi is rounded up and v_lo down, which can only
        # widen the bracket. The exact case (whole candidate set sampled) bisects to the end.
        tol = tl.where(ns == n_cand, 0, TOL).to(tl.int64)
        zero = tl.min(tl.where(ok, u, 0), 0) * 0
        rank = tl.where(which == 0, tl.maximum(r_hi, 0), tl.minimum(r_lo, ns - 1))
        v_lo, v_hi = _kth_largest_mp(u, ok, rank, zero, zero + 4294967295, tol, PIVOTS)
        val_hi = tl.where(r_hi < 0, val, v_hi)
        val_lo = tl.where(r_lo >= ns, zero, v_lo)
        val = tl.where(which == 0, val_hi, val_lo)
    tl.store(state_ptr + bh * 2 + which, val)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_bits(keep, N: tl.constexpr):
    """[N] bool -> [N // 32] int32 words, bit i of word w = keep[32 * w + i]."""
    lane = tl.arange(0, 32)
    bits = tl.reshape(keep.to(tl.int32), [N // 32, 32]) << lane[None, :]
    return tl.reduce(bits, 1, _bit_or)


@triton.jit
def _emit_kernel(
    logits_ptr, logz_ptr, len_ptr, k_ptr, local_ptr, state_ptr, count64_ptr, idx_ptr, cand_ptr, ckey_ptr,
    bits_ptr, tcount_ptr, num_kv_heads, s_cap, k_max, n_tiles,
    G: tl.constexpr, G_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, DET: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Append one chunk's surely-kept positions to the index list and its bracket candidates to
    the candidate list (position in cand, key in ckey: int32, `_signed_key`).

    Reads 4 * g bytes per candidate position of the chunk (the logits); writes 4 bytes per
    appended position (8 per bracket candidate), plus one 64-bit atomic per block tile on count64[bh] (= the int32 pair
    (kept so far, candidates) of count[bh], little-endian).
    DET (deterministic order): the kept positions are not appended; instead each tile (BLOCK_S
    positions, tile t = s // BLOCK_S) writes its keep bitmap (BLOCK_S / 8 bytes, bits[bh]) and
    its kept count (tcount[bh, t]); `_compact_kernel` turns them into the index list in
    ascending position order once `_resolve_kernel` has added its winners. The candidate list is
    still appended in tile-scheduling order: everything derived from it is order independent.
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    length = tl.load(len_ptr + b)
    kb = tl.load(k_ptr + b)
    lb = tl.load(local_ptr + b)
    read_lim = tl.where(kb < length, length - lb, 0)  # candidates are s < read_lim
    u_hi = tl.load(state_ptr + bh * 2)
    u_lo = tl.load(state_ptr + bh * 2 + 1)
    # g = 1: the bracket in int32 keys (`_order_key32`, int32 compares: 66 -> 57 us at MHA B8 64k on the
    # H200): U_hi = 2^32 ("nothing above") clamps to the largest key, which no key exceeds; U_lo = 2^32
    # (no selection) admits no candidate
    k_hi = _signed_key(tl.minimum(u_hi, 4294967295))
    lo_ok = u_lo <= 4294967295
    k_lo = tl.where(lo_ok, _signed_key(tl.minimum(u_lo, 4294967295)), 2147483647)
    k_top = tl.where(lo_ok, k_hi, -2147483648)  # candidates need k_lo <= u <= k_top: none without U_lo
    offs_s = tl.arange(0, BLOCK_S)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + offs_s
        ok = s < end
        is_cand = ok & (s < read_lim)
        if G == 1:  # unmasked (vectorised) load when the tile lies inside the buffer
            if s0 + BLOCK_S <= s_cap:
                v = tl.load(logits_ptr + bh.to(tl.int64) * s_cap + s)
            else:
                v = tl.load(logits_ptr + bh.to(tl.int64) * s_cap + s, mask=s < s_cap, other=0.0)
            u = _order_key32(v)
            keep = (ok & (s >= read_lim)) | (is_cand & (u > k_hi))
            bnd = is_cand & (u >= k_lo) & (u <= k_top)
            key32 = u
        else:  # int64 keys: measured faster than int32 ones for g > 1 on the H200 (GQA B16 64k: 66 vs 77 us)
            u = _key_at(logits_ptr, logz_ptr, bh, s, is_cand, s_cap, G, G_PAD)
            keep = (ok & (s >= read_lim)) | (is_cand & (u > u_hi))
            bnd = is_cand & (u >= u_lo) & (u <= u_hi)
            key32 = _signed_key(u)
        # one scan and one 64-bit atomic per tile for both lists: low half counts kept
        # positions, high half bracket candidates (a tile has < 2^16 positions)
        packed = keep.to(tl.int32) + (bnd.to(tl.int32) << 16)
        incl = tl.cumsum(packed, 0)
        total = tl.sum(packed, 0)
        base = tl.atomic_add(count64_ptr + bh, (total & 65535).to(tl.int64) + ((total >> 16).to(tl.int64) << 32),
                             sem="relaxed")  # a slot reservation: no ordering needed
        excl = incl - packed
        pos_c = (base >> 32).to(tl.int32) + (excl >> 16)
        if DET:
            tl.store(tcount_ptr + bh * n_tiles + s0 // BLOCK_S, total & 65535)
            tl.store(bits_ptr + bh.to(tl.int64) * (n_tiles * (BLOCK_S // 32)) + s0 // 32
                     + tl.arange(0, BLOCK_S // 32), _pack_bits(keep, BLOCK_S))
        else:
            pos_k = (base & 4294967295).to(tl.int32) + (excl & 65535)
            tl.store(idx_ptr + bh.to(tl.int64) * k_max + pos_k, s, mask=keep & (pos_k < k_max))
        tl.store(cand_ptr + bh.to(tl.int64) * s_cap + pos_c, s, mask=bnd)
        tl.store(ckey_ptr + bh.to(tl.int64) * s_cap + pos_c, key32, mask=bnd)


@triton.jit
def _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list, list_lim, fallback, s_cap,
               G: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr, STORED: tl.constexpr = False):
    """(ok, position, key) of entries c0 .. c0 + BLOCK - 1 of the resolve kernel's in-memory list:
    the bracket candidates, or (fallback: list_lim = 0) the positions 0 .. n_cand - 1. Every pass
    over the list computes its keys with this one function (same code, same shape), so that the
    threshold found by one pass compares equal with the keys of the next (g > 1 keys are sums).
    STORED (deterministic path): in the fallback the keys were written once to cand_row (int32,
    `_signed_key`) by `_store_fallback_keys` and are read back, because on the GPU the same sum
    recomputed in another loop can round differently (measured: a kept slot short)."""
    offs = tl.arange(0, BLOCK)
    ok = c0 + offs < n_list
    pos = tl.load(cand_row + c0 + offs, mask=ok & (offs < list_lim), other=0)
    pos = tl.where(fallback, c0 + offs, pos)
    if STORED:
        in_fb = offs >= list_lim  # all lanes in the fallback (list_lim = 0), none otherwise
        u = _key_at(logits_ptr, logz_ptr, bh, pos, ok & (offs < list_lim), s_cap, G, G_PAD)
        st = tl.load(cand_row + c0 + offs, mask=ok & in_fb, other=0)
        u = tl.where(in_fb, st.to(tl.int64) + 2147483648, u)
    else:
        u = _key_at(logits_ptr, logz_ptr, bh, pos, ok, s_cap, G, G_PAD)
    return ok, pos, u


@triton.jit
def _store_fallback_keys(logits_ptr, logz_ptr, cand_row, bh, n_cand, s_cap,
                         G: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic fallback: the keys of positions 0 .. n_cand - 1, computed once, into cand_row."""
    for c0 in range(0, n_cand, BLOCK):
        pos = c0 + tl.arange(0, BLOCK)
        ok = pos < n_cand
        u = _key_at(logits_ptr, logz_ptr, bh, pos, ok, s_cap, G, G_PAD)
        tl.store(cand_row + pos, _signed_key(u), mask=ok)
    tl.debug_barrier()


@triton.jit
def _mark_kept(bits_row, tc_row, pos, keep, TILE: tl.constexpr):
    """DET: add kept positions `pos[keep]` (int32, any order, none already marked) to the keep
    bitmap and the per-tile kept counts. Integer atomics commute: the result does not depend on
    the order of the updates."""
    one = pos * 0 + 1
    tl.atomic_or(bits_row + (pos >> 5), one << (pos & 31), mask=keep, sem="relaxed")
    tl.atomic_add(tc_row + pos // TILE, one, mask=keep, sem="relaxed")


@triton.jit
def _resolve_in_registers(logits_ptr, logz_ptr, ckey_ptr, state_ptr, cand_row, idx_row, bits_row, tc_row, bh,
                          n_list, m, base, s_cap, k_max, G: tl.constexpr, G_PAD: tl.constexpr, N: tl.constexpr,
                          PIVOTS: tl.constexpr, TILE: tl.constexpr, DET: tl.constexpr, CKEYS: tl.constexpr):
    """The resolve's usual case: the m largest of the n_list <= N bracket candidates, held in an
    N-key register tile (positions and keys read once: 8 bytes per candidate with CKEYS, else 4 + 4 g),
    marked in the keep bitmap (DET) or appended to the index list at base."""
    offs_r = tl.arange(0, N)
    ok_r = offs_r < n_list
    pos_r = tl.load(cand_row + offs_r, mask=ok_r, other=0)
    if CKEYS:  # the key emit computed: the same number it classified the candidate with
        u_r = tl.load(ckey_ptr + bh.to(tl.int64) * s_cap + offs_r, mask=ok_r, other=0).to(tl.int64) + 2147483648
    else:  # recomputed from the logits (g scattered reads per candidate)
        u_r = _key_at(logits_ptr, logz_ptr, bh, pos_r, ok_r, s_cap, G, G_PAD)
    # every candidate lies in [U_lo, U_hi]: search inside the bracket only
    b_lo = tl.load(state_ptr + bh * 2 + 1)
    b_hi = tl.minimum(tl.load(state_ptr + bh * 2), 4294967295)
    thr_r, _ = _kth_largest_mp(u_r, ok_r, m - 1, b_lo, b_hi, b_lo * 0, PIVOTS)
    gt_r = ok_r & (u_r > thr_r)
    tie_r = ok_r & (u_r == thr_r)
    n_ties_r = m - tl.sum(gt_r.to(tl.int32), 0)
    if DET:
        # the n_ties_r earliest tied positions: s_cap - pos >= cut (values in [1, s_cap])
        cut = b_lo * 0
        if tl.sum(tie_r.to(tl.int32), 0) > n_ties_r:
            cut, _ = _kth_largest_mp(s_cap - pos_r.to(tl.int64), tie_r, n_ties_r - 1,
                                     b_lo * 0, b_lo * 0 + s_cap, b_lo * 0, PIVOTS)
        keep_r = gt_r | (tie_r & (s_cap - pos_r.to(tl.int64) >= cut))
        _mark_kept(bits_row, tc_row, pos_r, keep_r, TILE)
    else:
        tie_i_r = tie_r.to(tl.int32)
        keep_r = gt_r | ((tie_i_r > 0) & (tl.cumsum(tie_i_r, 0) - tie_i_r < n_ties_r))
        keep_i_r = keep_r.to(tl.int32)
        out_r = base + tl.cumsum(keep_i_r, 0) - keep_i_r
        tl.store(idx_row + out_r, pos_r, mask=keep_r & (out_r < k_max))


@triton.jit
def _resolve_kernel(
    logits_ptr, logz_ptr, len_ptr, k_ptr, local_ptr, state_ptr, count_ptr, idx_ptr, cand_ptr, ckey_ptr,
    bits_ptr, tcount_ptr, num_kv_heads, s_cap, k_max, n_tiles,
    G: tl.constexpr, G_PAD: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
    PIVOTS: tl.constexpr, PIVOTS_MEM: tl.constexpr, TILE: tl.constexpr, DET: tl.constexpr,
    CKEYS: tl.constexpr = True, FIT: tl.constexpr = True,
    PDL: tl.constexpr = False,
):
    """Exact winners inside the bracket (or, if the bracket missed, over all candidates).

    Usual case: reads 8 bytes per bracket candidate once (position and the key `_emit_kernel`
    stored beside it, held in registers; CKEYS = 0: 4 + 4 * g, the key recomputed from the
    logits), writes 4 bytes per winner. Fallback: 2 + (search rounds) passes over the candidate keys of the KV head
    (32 rounds with PIVOTS_MEM = 1, 11 with 8).

    DET: the winners are marked in the keep bitmap / tile counts of `_emit_kernel` (two integer
    atomics per winner) instead of appended, and ties at the threshold go to the EARLIEST
    positions (as in the reference), found by one more search over the tied candidates'
    positions (only when there are more ties than places), so the result does not depend on the
    candidate list's order. The fallback rewrites the whole bitmap and the tile counts in
    position order (one more pass over the candidate keys).
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    length = tl.load(len_ptr + b)
    kb = tl.load(k_ptr + b)
    lb = tl.load(local_ptr + b)
    need = kb - lb
    if (kb < length) & (need > 0):
        n_cand = length - lb
        n_idx = tl.load(count_ptr + bh * 2)
        n_c = tl.load(count_ptr + bh * 2 + 1)
        need2 = need - (n_idx - lb)  # emitted so far: the local window + the sure winners
        fallback = (need2 < 0) | (need2 > n_c)
        idx_row = idx_ptr + bh.to(tl.int64) * k_max
        cand_row = cand_ptr + bh.to(tl.int64) * s_cap
        bits_row = bits_ptr + bh.to(tl.int64) * (n_tiles * (TILE // 32))
        tc_row = tcount_ptr + bh * n_tiles
        if not DET:
            if fallback:  # rewrite the index list: local window first
                for s0 in range(n_cand, length, BLOCK):
                    s = s0 + tl.arange(0, BLOCK)
                    tl.store(idx_row + (s - n_cand), s, mask=s < length)
        else:
            if fallback & (need > 0):  # the list is 0 .. n_cand - 1: cand_row is free for its keys
                _store_fallback_keys(logits_ptr, logz_ptr, cand_row, bh, n_cand, s_cap, G, G_PAD, BLOCK)
        base = tl.where(fallback, lb, n_idx)
        m = tl.where(fallback, need, need2)
        n_list = tl.where(fallback, n_cand, n_c)
        list_lim = tl.where(fallback, 0, BLOCK)  # fallback: the list is 0..n_cand-1, not cand_row
        if m > 0:
            if (n_list <= CAP) & (fallback == 0):
                # the tile the bracket fits: each search round compares every key of the tile with
                # the pivots, so a bracket of ~1300 keys in a 4096-key tile costs 3x its compares
                N8: tl.constexpr = CAP // 8 if CAP >= 128 else CAP
                N2: tl.constexpr = CAP // 2 if CAP >= 32 else CAP
                if FIT & (n_list <= N8):
                    _resolve_in_registers(logits_ptr, logz_ptr, ckey_ptr, state_ptr, cand_row, idx_row, bits_row,
                                          tc_row, bh, n_list, m, base, s_cap, k_max, G, G_PAD,
                                          N8, PIVOTS, TILE, DET, CKEYS)
                elif FIT & (n_list <= N2):
                    _resolve_in_registers(logits_ptr, logz_ptr, ckey_ptr, state_ptr, cand_row, idx_row, bits_row,
                                          tc_row, bh, n_list, m, base, s_cap, k_max, G, G_PAD,
                                          N2, PIVOTS, TILE, DET, CKEYS)
                else:
                    _resolve_in_registers(logits_ptr, logz_ptr, ckey_ptr, state_ptr, cand_row, idx_row, bits_row,
                                          tc_row, bh, n_list, m, base, s_cap, k_max, G, G_PAD,
                                          CAP, PIVOTS, TILE, DET, CKEYS)
            else:
                offs = tl.arange(0, BLOCK)
                lo = (base * 0).to(tl.int64)
                hi = lo + 4294967295
                if PIVOTS_MEM == 1:  # bisection: 32 passes over the candidates
                    while hi > lo:
                        mid = (lo + hi + 1) // 2
                        c = base * 0
                        for c0 in range(0, n_list, BLOCK):
                            ok, pos, u = _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list, list_lim,
                                                    fallback, s_cap, G, G_PAD, BLOCK, DET)
                            c += tl.sum((ok & (u >= mid)).to(tl.int32), 0)
                        take = c >= m
                        lo = tl.where(take, mid, lo)
                        hi = tl.where(take, hi, mid - 1)
                else:  # multi-pivot: ceil(32 / log2(PIVOTS_MEM + 1)) passes
                    while hi > lo:
                        piv, step = _pivots(lo, hi, PIVOTS_MEM)
                        c = tl.zeros([PIVOTS_MEM], tl.int32)
                        for c0 in range(0, n_list, BLOCK):
                            ok, pos, u = _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list, list_lim,
                                                    fallback, s_cap, G, G_PAD, BLOCK, DET)
                            k2 = _signed_key(tl.where(ok, u, 0))[:, None]
                            c += tl.sum((k2 >= piv[None, :]).to(tl.int32), axis=0)
                        lo, hi = _narrow(lo, hi, step, c, m - 1)
                thr = lo
                n_above = base * 0
                n_tied = base * 0
                for c0 in range(0, n_list, BLOCK):
                    ok, pos, u = _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list, list_lim,
                                            fallback, s_cap, G, G_PAD, BLOCK, DET)
                    n_above += tl.sum((ok & (u > thr)).to(tl.int32), 0)
                    n_tied += tl.sum((ok & (u == thr)).to(tl.int32), 0)
                n_ties = m - n_above
                if DET:
                    if fallback:
                        # rewrite the bitmap and tile counts of [0, length) in position order:
                        # the local window, the candidates above thr, the first n_ties ties
                        # (keys from the same code and shape as the threshold search's: BLOCK == TILE,
                        # so chunk c0 is bitmap tile c0 // TILE and thr compares with the same keys)
                        tl.static_assert(BLOCK == TILE)
                        ties = base * 0
                        for c0 in range(0, length, BLOCK):
                            ok, pos, u = _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list, list_lim,
                                                    fallback, s_cap, G, G_PAD, BLOCK, DET)
                            tie_i = (ok & (u == thr)).to(tl.int32)
                            s = c0 + offs
                            keep = ((s >= n_cand) & (s < length)) | (ok & ((u > thr) | (
                                (tie_i > 0) & (ties + tl.cumsum(tie_i, 0) - tie_i < n_ties))))
                            tl.store(bits_row + c0 // 32 + tl.arange(0, TILE // 32), _pack_bits(keep, TILE))
                            tl.store(tc_row + c0 // TILE, tl.sum(keep.to(tl.int32), 0))
                            ties += tl.sum(tie_i, 0)
                    else:
                        cut = lo * 0  # as in the register path: s_cap - pos >= cut for kept ties
                        if n_tied > n_ties:
                            c_lo = lo * 0
                            c_hi = c_lo + s_cap
                            while c_hi > c_lo:
                                piv, step = _pivots(c_lo, c_hi, PIVOTS_MEM)
                                c = tl.zeros([PIVOTS_MEM], tl.int32)
                                for c0 in range(0, n_list, BLOCK):
                                    ok, pos, u = _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list,
                                                            list_lim, fallback, s_cap, G, G_PAD, BLOCK, DET)
                                    k2 = _signed_key(tl.where(ok & (u == thr), s_cap - pos.to(tl.int64), 0))[:, None]
                                    c += tl.sum((k2 >= piv[None, :]).to(tl.int32), axis=0)
                                c_lo, c_hi = _narrow(c_lo, c_hi, step, c, n_ties - 1)
                            cut = c_lo
                        for c0 in range(0, n_list, BLOCK):
                            ok, pos, u = _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list, list_lim,
                                                    fallback, s_cap, G, G_PAD, BLOCK, DET)
                            keep = ok & ((u > thr) | ((u == thr) & (s_cap - pos.to(tl.int64) >= cut)))
                            _mark_kept(bits_row, tc_row, pos, keep, TILE)
                else:
                    written = base
                    ties = base * 0
                    for c0 in range(0, n_list, BLOCK):
                        ok, pos, u = _list_keys(logits_ptr, logz_ptr, cand_row, bh, c0, n_list, list_lim,
                                                fallback, s_cap, G, G_PAD, BLOCK, DET)
                        tie_i = (ok & (u == thr)).to(tl.int32)
                        keep = ok & ((u > thr) | ((tie_i > 0) & (ties + tl.cumsum(tie_i, 0) - tie_i < n_ties)))
                        keep_i = keep.to(tl.int32)
                        out = written + tl.cumsum(keep_i, 0) - keep_i
                        tl.store(idx_row + out, pos, mask=keep & (out < k_max))
                        written += tl.sum(keep_i, 0)
                        ties += tl.sum(tie_i, 0)
        tl.store(count_ptr + bh * 2, base + m)  # final kept count (= k_b)


@triton.jit
def _compact_kernel(len_ptr, bits_ptr, tcount_ptr, idx_ptr, num_kv_heads, k_max, n_tiles,
                    CHUNK: tl.constexpr, TILE: tl.constexpr, NT_PAD: tl.constexpr, ASM: tl.constexpr = False,
                    PDL: tl.constexpr = False):
    """DET: the index list of KV head bh in ascending position order, from the keep bitmap and
    the per-tile kept counts (`_emit_kernel` + `_resolve_kernel`). Program (bh, split) writes the
    kept positions of the tiles of positions [split * CHUNK, (split + 1) * CHUNK) at the exclusive
    scan of the earlier tiles' counts.

    Reads 4 * (tiles before the chunk) bytes of counts and TILE / 8 bytes of bitmap per tile of
    the chunk below length; writes 4 bytes per kept position.
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    length = tl.load(len_ptr + b)
    n_valid = (length + TILE - 1) // TILE  # tiles written this step
    t_start = split * (CHUNK // TILE)
    if t_start < n_valid:
        offs_t = tl.arange(0, NT_PAD)
        base = tl.sum(tl.load(tcount_ptr + bh * n_tiles + offs_t, mask=offs_t < t_start, other=0), 0)
        t_end = tl.minimum(t_start + CHUNK // TILE, n_valid)
        NW: tl.constexpr = TILE // 32
        offs = tl.arange(0, NW)[:, None] * 32 + tl.arange(0, 32)[None, :]
        bits_row = bits_ptr + bh.to(tl.int64) * (n_tiles * NW)
        idx_row = idx_ptr + bh.to(tl.int64) * k_max
        for t in range(t_start, t_end):
            bit, rank, cnt = _ranks_in_words(tl.load(bits_row + t * NW + tl.arange(0, NW)), ASM)
            out = base + rank
            tl.store(idx_row + out, t * TILE + offs, mask=(bit > 0) & (out < k_max))
            base += tl.sum(cnt, 0)
