"""Step 2a of SparQ: which positions each KV head keeps, without a sort and without host syncs.

Per KV head the kept set is: the last `local_b` valid positions, plus the `k_b - local_b`
candidates (valid, not local) with the largest selection key, or every valid position when
k_b >= length. The selection key is monotone in s_hat summed over the group's query heads:
- g = 1: the approximate logit itself (softmax is monotone), read straight from step 1's output;
- g > 1: c(s) = sum_j exp(logit_j(s) - logZ_j), written once by `_keys_hist_kernel`.
Each fp32 key maps to an order-preserving unsigned 32-bit integer u.

Threshold (radix) selection in three kernels:
1. `_keys_hist_kernel`: histogram of the top 12 bits of u over the candidates (split over blocks,
   one atomic add per non-empty bin and block).
2. `_emit_kernel`: every block scans the 4096-bin histogram for the boundary bin b1 (the bin that
   holds the n-th largest key), appends the positions above b1 and the local window to the index
   list, and the positions inside b1 to a candidate list.
3. `_resolve_kernel`: one block per KV head finishes the radix selection (10 + 10 more bits) on the
   small candidate list only, and appends the exact remaining winners (ties at the threshold are
   broken by candidate order, as any top-k may).
Only positions < length are read; the kept positions are appended in no particular order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HIST_BITS = 12
NUM_HIST_BINS = 1 << HIST_BITS
HIST_BINS = tl.constexpr(NUM_HIST_BINS)
LOW_BINS = tl.constexpr(1024)  # two further passes of 10 bits: 12 + 10 + 10 = 32


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


@triton.jit
def _order_key(v):
    """fp32 -> int64 in [0, 2^32), order preserving (-inf < ... < -0 <= +0 < ... < +inf)."""
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, (~bits).to(tl.int64), bits.to(tl.int64) + 2147483648)


@triton.jit
def _pick_bin(hist, need, NB: tl.constexpr):
    """Largest bin b with count(digit >= b) >= need, and count(digit > b)."""
    offs = tl.arange(0, NB)
    incl = tl.cumsum(hist, 0)
    total = tl.sum(hist, 0)
    suffix = total - incl + hist
    sel = tl.max(tl.where(suffix >= need, offs, -1), 0)
    above = tl.sum(tl.where(offs > sel, hist, 0), 0)
    return sel, above


@triton.jit
def _keys_hist_kernel(
    logits_ptr, logz_ptr, keys_ptr, len_ptr, k_ptr, local_ptr, hist_ptr,
    num_kv_heads, s_cap,
    G: tl.constexpr, G_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Histogram of the top 12 key bits over one chunk's candidates (+ the GQA key itself).

    Reads 4 * g bytes per candidate position (the logits); for g > 1 writes 4 bytes per candidate
    (the combined key). Atomically adds at most 4096 int32 counts per block.
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    length = tl.load(len_ptr + b)
    kb = tl.load(k_ptr + b)
    lb = tl.load(local_ptr + b)
    n_cand = length - lb
    if (kb < length) & (kb > lb):
        offs_s = tl.arange(0, BLOCK_S)
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < G
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, n_cand)
        hist = tl.zeros([HIST_BINS], tl.int32)
        if G > 1:
            logz = tl.load(logz_ptr + bh * G + offs_g, mask=g_ok, other=0.0)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + offs_s
            ok = s < end
            if G == 1:
                v = tl.load(logits_ptr + bh.to(tl.int64) * s_cap + s, mask=ok, other=0.0)
            else:
                lg = tl.load(logits_ptr + (bh * G + offs_g).to(tl.int64)[:, None] * s_cap + s[None, :],
                             mask=g_ok[:, None] & ok[None, :], other=float("-inf"))
                v = tl.sum(tl.exp(lg - logz[:, None]), axis=0)
                tl.store(keys_ptr + bh.to(tl.int64) * s_cap + s, v, mask=ok)
            digit = (_order_key(v) >> 20).to(tl.int32)
            digit = tl.where(ok, digit, 0)
            hist += tl.histogram(digit, HIST_BINS)
            # masked lanes were counted in bin 0: take them out again
            hist -= tl.where(tl.arange(0, HIST_BINS) == 0, tl.sum((~ok).to(tl.int32), 0), 0)
        if start < end:
            offs_h = tl.arange(0, HIST_BINS)
            tl.atomic_add(hist_ptr + bh * HIST_BINS + offs_h, hist, mask=hist > 0)


@triton.jit
def _emit_kernel(
    keys_ptr, len_ptr, k_ptr, local_ptr, hist_ptr, state_ptr, count_ptr, idx_ptr, cand_ptr,
    num_kv_heads, s_cap, k_max,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Append the surely-kept positions of one chunk to the index list, the boundary bin's to the
    candidate list.

    Reads 16 KiB of histogram (L2-resident) and 4 bytes of key per candidate position of the chunk;
    writes 4 bytes per appended position (index or candidate) plus one atomic per block and list.
    state[bh] = (b1, need inside b1); count[bh] = (kept so far, candidates).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    length = tl.load(len_ptr + b)
    kb = tl.load(k_ptr + b)
    lb = tl.load(local_ptr + b)
    n_cand = length - lb
    not_all = kb < length
    need = kb - lb
    active = not_all & (need > 0)
    hist = tl.load(hist_ptr + bh * HIST_BINS + tl.arange(0, HIST_BINS))
    sel, above = _pick_bin(hist, need, HIST_BINS)
    b1 = tl.where(active, sel, HIST_BINS)  # HIST_BINS: no candidate is above or inside this bin
    need2 = tl.where(active, need - above, 0)
    if split == 0:
        tl.store(state_ptr + bh * 2, b1)
        tl.store(state_ptr + bh * 2 + 1, need2)
    offs_s = tl.arange(0, BLOCK_S)
    read_lim = tl.where(not_all, n_cand, 0)  # keys are read for candidates only
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + offs_s
        ok = s < end
        is_cand = ok & (s < read_lim)
        v = tl.load(keys_ptr + bh.to(tl.int64) * s_cap + s, mask=ok & (s < read_lim), other=0.0)
        digit = (_order_key(v) >> 20).to(tl.int32)
        keep = ok & ((s >= read_lim) | (digit > b1))  # local window / keep-all, or above b1
        bnd = is_cand & (digit == b1)
        keep_i = keep.to(tl.int32)
        n_keep = tl.sum(keep_i, 0)
        if n_keep > 0:
            base = tl.atomic_add(count_ptr + bh * 2, n_keep)
            pos = base + tl.cumsum(keep_i, 0) - keep_i
            tl.store(idx_ptr + bh.to(tl.int64) * k_max + pos, s, mask=keep & (pos < k_max))
        bnd_i = bnd.to(tl.int32)
        n_bnd = tl.sum(bnd_i, 0)
        if n_bnd > 0:
            base = tl.atomic_add(count_ptr + bh * 2 + 1, n_bnd)
            pos = base + tl.cumsum(bnd_i, 0) - bnd_i
            tl.store(cand_ptr + bh.to(tl.int64) * s_cap + pos, s, mask=bnd)


@triton.jit
def _resolve_kernel(
    keys_ptr, state_ptr, count_ptr, idx_ptr, cand_ptr, s_cap, k_max,
    BLOCK: tl.constexpr,
):
    """Exact top-`need` among one KV head's boundary-bin candidates (radix, 10 + 10 bits).

    Reads the candidate list three times (4 bytes of position + 4 bytes of key per candidate and
    pass; typically ~1-3% of the sequence); writes 4 bytes per winner.
    """
    bh = tl.program_id(0)
    b1 = tl.load(state_ptr + bh * 2)
    need = tl.load(state_ptr + bh * 2 + 1)
    n_c = tl.load(count_ptr + bh * 2 + 1)
    if need > 0 and n_c > 0:
        out_base = tl.load(count_ptr + bh * 2)
        offs = tl.arange(0, BLOCK)
        key_base = keys_ptr + bh.to(tl.int64) * s_cap
        cand_base = cand_ptr + bh.to(tl.int64) * s_cap
        # pass A: bits 19..10
        hist = tl.zeros([LOW_BINS], tl.int32)
        for c0 in range(0, n_c, BLOCK):
            ok = c0 + offs < n_c
            pos = tl.load(cand_base + c0 + offs, mask=ok, other=0)
            u = _order_key(tl.load(key_base + pos, mask=ok, other=0.0))
            d = tl.where(ok, ((u >> 10) & 1023).to(tl.int32), 0)
            hist += tl.histogram(d, LOW_BINS)
            hist -= tl.where(tl.arange(0, LOW_BINS) == 0, tl.sum((~ok).to(tl.int32), 0), 0)
        da, above = _pick_bin(hist, need, LOW_BINS)
        need_b = need - above
        # pass B: bits 9..0 of the candidates that match digit A
        hist = tl.zeros([LOW_BINS], tl.int32)
        for c0 in range(0, n_c, BLOCK):
            ok = c0 + offs < n_c
            pos = tl.load(cand_base + c0 + offs, mask=ok, other=0)
            u = _order_key(tl.load(key_base + pos, mask=ok, other=0.0))
            m = ok & (((u >> 10) & 1023).to(tl.int32) == da)
            d = tl.where(m, (u & 1023).to(tl.int32), 0)
            hist += tl.histogram(d, LOW_BINS)
            hist -= tl.where(tl.arange(0, LOW_BINS) == 0, tl.sum((~m).to(tl.int32), 0), 0)
        db, above_b = _pick_bin(hist, need_b, LOW_BINS)
        n_ties = need_b - above_b  # how many keys equal to the threshold are kept
        thr = (b1.to(tl.int64) << 20) | (da.to(tl.int64) << 10) | db.to(tl.int64)
        # emit: everything above the threshold, and the first n_ties keys equal to it
        written = out_base
        ties = out_base * 0
        for c0 in range(0, n_c, BLOCK):
            ok = c0 + offs < n_c
            pos = tl.load(cand_base + c0 + offs, mask=ok, other=0)
            u = _order_key(tl.load(key_base + pos, mask=ok, other=0.0))
            tie_i = (ok & (u == thr)).to(tl.int32)
            tie_rank = ties + tl.cumsum(tie_i, 0) - tie_i
            keep = ok & ((u > thr) | ((tie_i > 0) & (tie_rank < n_ties)))
            keep_i = keep.to(tl.int32)
            out = written + tl.cumsum(keep_i, 0) - keep_i
            tl.store(idx_ptr + bh.to(tl.int64) * k_max + out, pos, mask=keep & (out < k_max))
            written += tl.sum(keep_i, 0)
            ties += tl.sum(tie_i, 0)
        tl.store(count_ptr + bh * 2, written)  # final kept count (= k_b)
