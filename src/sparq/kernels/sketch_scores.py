"""Step 1 of `sparq-sketch` on the kernels: approximate logits from the packed key sketch.

Same contract as `approx_scores.score_transposed_keys` (approx_scores.py module docstring): fills
`ws.logits [BH, g, capacity]` (fp32 logits times the softmax scale), `ws.split_m`, `ws.split_l` per
split of `ws.chunk1` positions, so `DecodePlan`'s selection, gather and combine run unchanged.
The logits are those of `methods/sketch.py`: q . k_hat * scale with k_hat = `key_sketch(...)`
(all d dims of the dequantised 1/2-bit sketch kept by `sketch_state.SketchState`; a row with no
finished block yet is scored from its exact keys, read from the K buffer).

Per tile of BLOCK_S positions (BLOCK_S divides the sketch block, so one tile has one range):
  q . (lo + c * step) = q . lo + (q * step) . c
so the codes c (small integers, exact in fp16) go to the tensor cores as they are and the range is
folded into the query once per tile. q * step is fp32; it is split into fp16 hi + lo parts
(two dots, fp32 accumulation) so the logits keep ~fp32 precision (one fp16 dot would round the
query-range product to 11 bits; limit: |q * scale * step| < 65504).

`SketchConfig` is the plan's budget for the sketch method: k_b, local_b per row as
`SparQSketch.k_for` / `local_for` give them. No `SparQConfig` reproduces them (the sketch's
overhead subtracts floor(length / block) from k, and k jumps when the first block finishes), so
the step looks the sketch method's budgets up in `SketchConfig.budget_table` (`select._budgets_of`, at
the start of the sample kernel) and the plan sizes its kept-index list with `SketchConfig.k_bound`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .pdl import wait_for_previous

from ..methods.sketch import SparQSketch
from .select import _in_sample
from .sketch_state import SketchState


@dataclass(frozen=True)
class SketchConfig:
    """The plan-side settings of `SparQSketch` for one head_dim (hashable: part of a plan's identity).

    Quacks like `SparQConfig` where `DecodePlan` and `select.selection_sizes` look (`k_for(length)`,
    `local_for(length)`, `reallocate`, `k_fraction`, `local_fraction`, `r`), with the sketch
    method's budgets."""

    fraction: float
    bits: int
    block: int
    head_dim: int
    local_fraction: float = 0.25
    reallocate: bool = True
    min_k: int = 16

    @classmethod
    def from_method(cls, method: SparQSketch, head_dim: int) -> "SketchConfig":
        return cls(float(method.fraction), int(method.bits), int(method.block), int(head_dim),
                   float(method.local_fraction), bool(method.reallocate), int(method.min_k))

    @property
    def method(self) -> SparQSketch:
        return SparQSketch(self.fraction, bits=self.bits, block=self.block, local_fraction=self.local_fraction,
                           reallocate=self.reallocate, min_k=self.min_k)

    # what DecodePlan reads of a SparQConfig: no dims are selected (r = 1 keeps the unused
    # workspaces of the paper's step 1 minimal); the budget fractions go to the budgets kernel
    r = 1
    k = 1
    local_window = 0

    @property
    def k_fraction(self) -> float:
        return self.fraction

    def k_for(self, length: int) -> int:
        return self.method.k_for(int(length), self.head_dim)

    def local_for(self, length: int) -> int:
        m = self.method
        return m.local_for(m.k_for(int(length), self.head_dim))

    def budget_table(self, capacity: int) -> np.ndarray:
        """int32 [capacity + 1, 2]: (k_for(n), local_for(n)) for every length n (row 0 unused), the
        method's own float64 operations (`rows_for`, Python's round half to even) in numpy."""
        n = np.arange(0, capacity + 1, dtype=np.float64)
        if self.fraction >= 1:
            k = n.copy()
        else:
            d = float(self.head_dim)
            n_full = np.floor(n / self.block)
            over = np.where(n_full == 0, n * d, n * d * self.bits / 16 + 2 * d * n_full)
            k = np.floor((self.fraction * 2 * n * d - over) / (2 * d) + 1e-9)
            k = np.minimum(n, np.maximum(np.maximum(self.min_k, k), 1))
        local = np.minimum(k, np.round(self.local_fraction * k))
        return np.stack([k, local], 1).astype(np.int32)

    def k_bound(self, capacity: int) -> int:
        """max of k_for over lengths 1..capacity (k drops by one when a block finishes, so
        k_for(capacity) is not always the largest). Same float64 operations as `rows_for`."""
        if self.fraction >= 1:
            return int(capacity)
        n = np.arange(1, capacity + 1, dtype=np.float64)
        d = float(self.head_dim)
        n_full = np.floor(n / self.block)
        over = np.where(n_full == 0, n * d, n * d * self.bits / 16 + 2 * d * n_full)
        k = np.floor((self.fraction * 2 * n * d - over) / (2 * d) + 1e-9)
        k = np.minimum(n, np.maximum(np.maximum(self.min_k, k), 1))
        return int(k.max())


@triton.jit
def _dot_f32(a, b, SPLIT: tl.constexpr):
    """a [M, K] fp32 @ b [K, N] at ~fp32 precision. SPLIT = n > 0: b's values are exact in its
    16-bit dtype and a goes in as n parts of that dtype (n tensor-core dots, fp32 sums): 2 parts
    carry 22 bits of a in fp16, 3 parts 24 bits in bf16. SPLIT = 0: fp32 FMA dot."""
    if SPLIT > 0:
        a_hi = a.to(b.dtype)
        rest = a - a_hi.to(tl.float32)
        a_mid = rest.to(b.dtype)
        acc = tl.dot(a_hi, b) + tl.dot(a_mid, b)
        if SPLIT > 2:
            acc += tl.dot((rest - a_mid.to(tl.float32)).to(b.dtype), b)
        return acc
    else:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")


@triton.jit
def _emit_tile(acc, s, s_ok, out_base, g_ok, m_i, l_i, s0, s_cap, BLOCK_S: tl.constexpr):
    """Store one tile's logits acc [G_PAD, BLOCK_S] (positions past the chunk as -inf) and fold
    them into the running split statistics (max, sum of exp)."""
    logit = tl.where(s_ok[None, :], acc, float("-inf"))
    if s0 + BLOCK_S <= s_cap:
        tl.store(out_base + s[None, :], logit, mask=g_ok[:, None])
    else:
        tl.store(out_base + s[None, :], logit, mask=g_ok[:, None] & (s[None, :] < s_cap))
    m_new = tl.maximum(m_i, tl.max(logit, axis=1))
    l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _lop3_or_and(x, mask, magic, ASM: tl.constexpr):
    """(x & mask) | magic. On the GPU one LOP3 with mask and magic in registers (ptxas would fold
    the constants into two immediate LOP3s: a LOP3 takes one immediate)."""
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [x, mask, magic],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return (x & mask) | magic


@triton.jit
def _unpack_codes(words, BS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                  WG: tl.constexpr):
    """words [BS, 4, HH] int32 (`_code_words`' tile) -> codes [BS, D] fp16 (exact small integers).

    `code_layout` stores the dims j = 16 c + 4 t + 2 p + e of pair (t, c, p) in the two 16-bit
    halves of one word at the same offset b, so one LOP3 of the (pre-shifted) word with the mask
    (levels << b) | (levels << b + 16) and the fp16 exponent 25 - b in both halves ("magic
    number") gives the two fp16 values 2^(10 - b) + code, and one HADD2 subtracts 2^(10 - b),
    exactly. Offsets b >= 10 (inside the exponent field) are shifted down by 10 first (one shift
    per word). The result is ordered so that Triton's mma operand layout (kWidth 4: lane % 4 = t,
    registers (p, e)) is the layout the words were loaded in: no shared-memory round trip."""
    SLOTS: tl.constexpr = 16 // BITS  # pairs per word
    PAIRS: tl.constexpr = D // 8  # pairs per t
    U: tl.constexpr = SLOTS if SLOTS < PAIRS else PAIRS  # pairs of one t in one word
    HH: tl.constexpr = PAIRS // U  # words of one t
    LEVELS: tl.constexpr = (1 << BITS) - 1
    t = tl.arange(0, 4)[None, :, None, None]
    pair = tl.arange(0, HH)[None, None, :, None] * U + tl.arange(0, U)[None, None, None, :]
    if SLOTS <= PAIRS:  # whole words per t: the offsets are constants
        b = (pair % SLOTS) * BITS
    else:  # several t share a word (d * bits < 128): the offset depends on the lane
        b = ((t * PAIRS + pair) % SLOTS) * BITS
    sh = tl.where(b >= 10, 10, 0)
    b = b - sh
    mask = (LEVELS << b) | (LEVELS << (b + 16))
    magic = ((25 - b) << 10) | ((25 - b) << 26)
    v = _lop3_or_and(words[:, :, :, None] >> sh, mask, magic, ASM)  # [BS, 4, HH, U]
    off = (1 << (10 - b)).to(tl.float16)
    lo = v.to(tl.int16).to(tl.float16, bitcast=True) - off
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True) - off
    c = tl.reshape(tl.join(lo, hi), (BS, 4, D // 16, 2, 2))  # [BS, t, c, p, e]
    if WG:  # columns k = 16 c + 8 p + 2 t + e (`_code_dims`): wgmma's register operand (kWidth 2)
        return tl.reshape(tl.permute(c, (0, 2, 3, 1, 4)), (BS, D))
    else:  # columns in dim order, 16 c + 4 t + 2 p + e: mma.sync's operand as Triton lays it (kWidth 4)
        return tl.reshape(tl.permute(c, (0, 2, 1, 3, 4)), (BS, D))


@triton.jit
def _code_dims(D: tl.constexpr, WG: tl.constexpr):
    """[D] int32: the dim of each column of `_unpack_codes`' tile (the B operand's rows follow it:
    the same product up to the order of the fp32 sums inside each group of 16 columns)."""
    k = tl.arange(0, D)
    if WG:
        return (k // 16) * 16 + ((k // 2) % 4) * 4 + ((k // 8) % 2) * 2 + k % 2
    else:
        return k


@triton.jit
def _step(lo, hi, LEVELS: tl.constexpr, ASM: tl.constexpr):
    """(hi - lo) / LEVELS rounded to nearest, as `tl.math.div_rn` (the append kernel's step).
    LEVELS = 1: the difference itself. LEVELS = 3 on the GPU: q0 = x * RN(1/3), e = fma(-q0, 3, x)
    (exact), q0 + e * RN(1/3) in one fma: the fast path of div.rn.f32 without its range check and
    slow-path call (~12 instructions each); equal to div_rn for every x in [2^-100, fp32 max]
    (checked over all mantissas; the check only sends x outside that range to the slow path).
    Below 2^-100 (a range narrower than 2^-100: fp16 cannot make one) the step may differ in the
    last bits, which changes no logit: its fp16 hi / lo parts of q * step are 0 either way for
    |q * scale| < 2^75; x = inf (a bf16 range wider than fp32 max) gives NaN instead of inf (the
    logits are inf / NaN either way)."""
    x = hi - lo
    if LEVELS == 1:
        return x
    elif ASM:
        tl.static_assert(LEVELS == 3, "the fast division is checked for 2-bit codes only")
        q0 = x * 0.3333333432674407959
        return tl.fma(tl.fma(q0, -3.0, x), 0.3333333432674407959, q0)
    else:
        return tl.math.div_rn(x, tl.full(x.shape, LEVELS, tl.float32))


@triton.jit
def _exp(x, ASM: tl.constexpr):
    """exp(x) for the split statistics. On the GPU ex2.approx.ftz (FMUL + MUFU, ~5 instructions
    fewer than tl.exp's denormal-safe ex2): the same value unless exp(x) < 2^-126, where it gives 0
    instead of a denormal; in the running sums below every such term is added to (or scaled by
    a factor of) a sum >= 1, so the statistics are unchanged."""
    if ASM:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _load_words(code_row, s, s_ok, widx, BS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """The tile's words as `_unpack_codes` takes them, [BS, 4, HH]. When each t owns whole words
    (d * bits >= 128) they are a position's W words in order (word = t * HH + hh): loaded as one
    contiguous [BS, W] row (16-byte cp.async) and reshaped; else gathered by `_code_words`."""
    W: tl.constexpr = D * BITS // 32
    if D * BITS >= 128:
        w = tl.load(code_row + (s * W)[:, None] + tl.arange(0, W)[None, :], mask=s_ok[:, None], other=0)
        return tl.reshape(w, (BS, 4, W // 4))
    else:
        return tl.load(code_row + (s * W)[:, None, None] + widx, mask=s_ok[:, None, None], other=0)


@triton.jit
def _code_words(D: tl.constexpr, BITS: tl.constexpr):
    """[1, 4, HH] int32: which of a position's words holds pairs (t, hh) (see `_unpack_codes`)."""
    SLOTS: tl.constexpr = 16 // BITS
    PAIRS: tl.constexpr = D // 8
    U: tl.constexpr = SLOTS if SLOTS < PAIRS else PAIRS
    HH: tl.constexpr = PAIRS // U
    t = tl.arange(0, 4)[None, :, None]
    return (t * PAIRS + tl.arange(0, HH)[None, None, :] * U) // SLOTS


@triton.jit
def _dot_hi_lo(c, a, even, base, BS: tl.constexpr, GQ: tl.constexpr, SPLIT_C: tl.constexpr):
    """c [BS, D] @ a [D, 2 * GQ] (columns 2g, 2g + 1 both q_g * step, fp32) + q . lo -> logits [BS, GQ].

    SPLIT_C: one fp16 MMA whose B column 2g is a's fp16 hi part and column 2g + 1 its fp16 lo part,
    the two summed in fp32 (~fp32 logits; GQ = 4: an N = 8 mma.sync; GQ >= 8 makes triton 3.6 take
    wgmma, whose register operand (kWidth 2) wants another column order of the codes:
    `_unpack_codes(WG=1)` produces it and a's rows follow (`_code_dims`)). Else an fp32 dot
    (the interpreter's fp32 keys) whose odd columns are dropped. base [2 * GQ] (q . lo, each
    query twice) is added to the even columns."""
    if SPLIT_C:
        a_hi = a.to(tl.float16)
        acc = tl.dot(c, tl.where(even[None, :], a_hi, (a - a_hi.to(tl.float32)).to(tl.float16)))
    else:
        acc = tl.where(even[None, :], tl.dot(c.to(tl.float32), a, input_precision="ieee"), 0.0)
    acc_even, acc_odd = tl.split(tl.reshape(acc + tl.where(even, base, 0.0)[None, :], (BS, GQ, 2)))
    return acc_even + acc_odd


@triton.jit
def _sketch_scores_kernel(
    q_ptr, codes_ptr, lo_ptr, hi_ptr, key_ptr, len_ptr, starts_ptr, slots_ptr,
    logits_ptr, m_ptr, l_ptr, smp_ptr,
    stride_kb, stride_kh, stride_ks,
    num_kv_heads, s_cap, code_cap, n_blk_cap, n_split, n_smp, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, HAS_STARTS: tl.constexpr,
    HAS_SLOTS: tl.constexpr, SPLIT_C: tl.constexpr, SPLIT_K: tl.constexpr, STATS: tl.constexpr, ASM: tl.constexpr,
    SMP_SHIFT: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """Sketch logits of one (batch, KV head) over one chunk of the sequence (split-S).

    Reads, per position of the chunk below the row's length, d * bits / 8 bytes of codes, plus
    2 * d * elt bytes of range per tile of BLOCK_S positions and g * d * elt of query; a row
    with no finished block (length < block) reads its exact keys instead, d * elt per position
    (with slots, + the slot map's element size, 4 or 8, per position: HAS_SLOTS, a paged cache,
    reads position s of row b at row slots[starts[b] + s] of K, whose batch stride is 0).
    Writes 4 * g bytes of logits per position (the last tile's positions >= length as -inf) and
    8 * g bytes of split statistics (STATS = 0: nobody reads them; written as an empty split's);
    SMP_SHIFT > 0: also the logits of every 2^SMP_SHIFT-th position to smp [BH, g, n_smp] (the
    selection's sample, `select._sample_kernel`), 4 * g bytes per sampled position.

    The sketch loop computes logits transposed, [BLOCK_S, GQ] = codes [BLOCK_S, d] @ (q * step)ᵀ:
    the codes are the MMA's A operand, unpacked in registers (`_unpack_codes`), and the query's
    hi and lo fp16 parts are the 2 * GQ columns of one B operand (GQ = max(4, g) rounded to a
    power of two: 8 columns, the MMA's minimum, for g <= 4).
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    length = tl.load(len_ptr + b)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    W: tl.constexpr = D * BITS // 32

    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_S)
    n_full = length // BLOCK
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    if n_full == 0:  # no finished block yet: the exact keys ([G_PAD, BLOCK_S] tiles, G_PAD >= 16)
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < G
        q = tl.load(q_ptr + (bh * G + offs_g)[:, None] * D + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        q = q.to(tl.float32) * scale  # [G_PAD, D]
        k_base = key_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        if HAS_STARTS:
            first = tl.load(starts_ptr + b).to(tl.int64)
            if not HAS_SLOTS:  # left padding: logical position s is row starts[b] + s of K
                k_base += first * stride_ks
        out_base = logits_ptr + (bh * G + offs_g).to(tl.int64)[:, None] * s_cap  # [G_PAD, 1]
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        # 32-position key tiles, not pipelined: this loop runs only for a sequence's first block,
        # but a kernel's registers and shared memory are those of its largest path, and with the
        # sketch loop's 128-position pipelined tiles it held the whole kernel at 128 registers and
        # 53 KB (4 blocks per SM; now 80 registers, 16-20 KB, 6 blocks at d = 128, g = 1;
        # H200: the sketch loop 431 -> 396 us at MHA B8 64k)
        BLOCK_K: tl.constexpr = 32
        offs_k = tl.arange(0, BLOCK_K)
        for s0 in tl.range(start, end, BLOCK_K, num_stages=1):
            s = s0 + offs_k
            s_ok = s < end
            if HAS_SLOTS:  # paged: the row of position s is in the slot map
                k_row = tl.load(slots_ptr + first + s, mask=s_ok, other=0).to(tl.int64)
            else:
                k_row = s.to(tl.int64)
            k = tl.load(k_base + k_row[:, None] * stride_ks + offs_d[None, :], mask=s_ok[:, None], other=0.0)
            acc = _dot_f32(q, tl.trans(k), SPLIT_K)
            m_i, l_i = _emit_tile(acc, s, s_ok, out_base, g_ok, m_i, l_i, s0, s_cap, BLOCK_K)
        stat = (bh * G + offs_g) * n_split + split
        tl.store(m_ptr + stat, m_i, mask=g_ok)
        tl.store(l_ptr + stat, l_i, mask=g_ok)
        if SMP_SHIFT > 0:  # the selection's sample, copied back from the logits this block wrote (a
            # store inside the loop above raised the whole kernel from 80 to 90 registers: sm_90, g = 1)
            tl.debug_barrier()  # other threads' logit stores are visible after it
            STRIDE: tl.constexpr = 1 << SMP_SHIFT
            offs_i = tl.arange(0, 16)
            for p0 in range((start + STRIDE - 1) // STRIDE * STRIDE, end, 16 * STRIDE):
                p = p0 + offs_i * STRIDE
                p_ok = g_ok[:, None] & (p < end)[None, :]
                v = tl.load(out_base + p[None, :], mask=p_ok, other=0.0)
                tl.store(smp_ptr + (bh * G + offs_g).to(tl.int64)[:, None] * n_smp + (p >> SMP_SHIFT)[None, :], v,
                         mask=p_ok)
    else:  # the sketch; the loop has no branch, so its code loads can be pipelined
        offs_q = tl.arange(0, GQ)
        q_ok = offs_q < G
        # the MMA is a wgmma (N >= 16): codes in its column order (with words shared by lanes,
        # d * bits < 128, that order is no cheaper: 466 vs 460 at d = 64, 1 bit)
        WG: tl.constexpr = GQ >= 8 and D * BITS >= 128
        dims = _code_dims(D, WG)  # B's rows in the code tile's column order
        # B's 2 * GQ columns: column 2g + e is part e (fp16 hi, lo) of query g. The query and the
        # range are loaded in that [D, 2 * GQ] shape (each query twice) and B is computed in it
        # elementwise: building it by joining [D, GQ] hi and lo tensors gave a layout whose copy
        # to shared memory was a 16-way bank conflict per store (ncu, H200: 60% of the kernel's
        # shared-memory wavefronts were excessive)
        offs_c = tl.arange(0, 2 * GQ)
        col_q = offs_c // 2
        even = (offs_c % 2) == 0
        qt = tl.load(q_ptr + (bh * G + col_q)[None, :] * D + dims[:, None], mask=(col_q < G)[None, :], other=0.0)
        qt = qt.to(tl.float32) * scale  # [D, 2 * GQ], rows in `dims` order
        if WG:  # q . lo summed in dim order (the same fp32 sum as without the permutation)
            qn = tl.load(q_ptr + (bh * G + col_q)[None, :] * D + offs_d[:, None], mask=(col_q < G)[None, :], other=0.0)
            qn = qn.to(tl.float32) * scale
        code_row = codes_ptr + bh.to(tl.int64) * code_cap * W
        widx = _code_words(D, BITS)  # [1, 4, HH]
        rng = bh.to(tl.int64) * n_blk_cap * D
        out_q = logits_ptr + (bh * G + offs_q).to(tl.int64)[None, :] * s_cap  # [1, GQ]
        smp_q = (bh * G + offs_q)[None, :] * n_smp  # int32 offsets: the plan keeps the sample < 2^31 entries
        m_e = tl.full([BLOCK_S, GQ], float("-inf"), tl.float32)  # per element: reduced once, after the loop
        l_e = tl.zeros([BLOCK_S, GQ], tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + offs_s
            s_ok = offs_s < end - s0  # (a scalar bound: s0 stays out of the per-row compares)
            r = tl.minimum(s0 // BLOCK, n_full - 1)  # own block, or the last finished one
            # the range loaded as [D, 2 * GQ] (each column the same) in qt's layout: no layout conversion
            rp = rng + r * D + dims[:, None] + offs_c[None, :] * 0
            lo = tl.load(lo_ptr + rp).to(tl.float32)
            hi = tl.load(hi_ptr + rp).to(tl.float32)
            step = _step(lo, hi, LEVELS, ASM)
            a = qt * step  # [D, 2 * GQ]; step 0: the channel is lo whatever its code
            if WG:
                base = tl.sum(qn * tl.load(lo_ptr + rng + r * D + offs_d[:, None] + offs_c[None, :] * 0).to(tl.float32), axis=0)
            else:
                base = tl.sum(qt * lo, axis=0)  # [2 * GQ]: q . lo of each column's query
            words = _load_words(code_row, s, s_ok, widx, BLOCK_S, D, BITS)
            c = _unpack_codes(words, BLOCK_S, D, BITS, ASM, WG)  # [BLOCK_S, D] fp16
            acc_q = _dot_hi_lo(c, a, even, base, BLOCK_S, GQ, SPLIT_C)
            logit = tl.where(s_ok[:, None], acc_q, float("-inf"))  # [BLOCK_S, GQ]
            if s0 + BLOCK_S <= s_cap:
                tl.store(out_q + s[:, None], logit, mask=q_ok[None, :])
            else:
                tl.store(out_q + s[:, None], logit, mask=q_ok[None, :] & (offs_s[:, None] < s_cap - s0))
            if SMP_SHIFT > 0:  # the selection's sample: 1 / 2^SMP_SHIFT of the positions
                tl.store(smp_ptr + (smp_q + (s >> SMP_SHIFT)[:, None]), logit,
                         mask=q_ok[None, :] & _in_sample(s, s_ok, SMP_SHIFT)[:, None])
            if STATS:  # running max and sum of exp per element (no cross-thread reduction per tile)
                m_e_new = tl.maximum(m_e, logit)
                m_eref = tl.where(m_e_new > float("-inf"), m_e_new, 0.0)
                l_e = l_e * _exp(m_e - m_eref, ASM) + _exp(logit - m_eref, ASM)
                m_e = m_e_new
        stat_q = (bh * G + offs_q) * n_split + split
        if STATS:
            m_erow = tl.max(m_e, axis=0)
            m_eref = tl.where(m_erow > float("-inf"), m_erow, 0.0)
            tl.store(m_ptr + stat_q, m_erow, mask=q_ok)
            tl.store(l_ptr + stat_q, tl.sum(l_e * tl.exp(m_e - m_eref[None, :]), axis=0), mask=q_ok)
        else:  # an empty split's statistics: defined values for `_sample_kernel` (logZ is unread)
            tl.store(m_ptr + stat_q, tl.full([GQ], float("-inf"), tl.float32), mask=q_ok)
            tl.store(l_ptr + stat_q, tl.zeros([GQ], tl.float32), mask=q_ok)


def sketch_block_s(ws, sketch: SketchState) -> int:
    """Positions per scorer tile: a power of two dividing both the sketch block (one range per
    tile) and the plan's chunk (ws.block_s), at most 128 (the exact-key loop of short rows takes
    32 whatever this is); 64 at d > 128 with g >= 8 (128 spills registers there: triton 3.6, sm_90)."""
    return min(sketch.block, ws.block_s, 64 if sketch.head_dim > 128 and ws.g >= 8 else 128)


def score_sketch(ws, query: torch.Tensor, key: torch.Tensor, sketch: SketchState, lengths: torch.Tensor,
                 starts: torch.Tensor, has_starts: bool, scale: float, span: int | None = None,
                 slots: torch.Tensor | None = None) -> None:
    """Step 1 from the sketch into the plan's workspace (one launch).

    Bytes read per KV head: length * d * bits / 8 (codes) + 2 * d * elt per tile (ranges) +
    g * d * elt (query); rows shorter than one block read length * d * elt of exact keys instead
    (with `slots`, through the slot map: + its element size per position).
    Written: 4 * g * length (fp32 logits) + 8 * g * n_split (split statistics) + 4 * g * length /
    stride (the selection's sample, when the plan copies it: `DecodePlan.sample_shift`).
    span: the logical positions the sketch must cover (default key.shape[2]; less for a packed K
    buffer read through per-row starts, `DecodePlan.run`'s max_length).
    slots (with starts): the slot map of a paged K (`DecodePlan.run`'s slots).
    """
    batch, num_kv_heads, _, head_dim = key.shape
    if (sketch.batch, sketch.num_kv_heads, sketch.head_dim) != (batch, num_kv_heads, head_dim):
        raise ValueError("the sketch does not belong to this cache")
    if sketch.capacity < (key.shape[2] if span is None else span) or (sketch.bits, sketch.block) != (ws.config.bits, ws.config.block):
        raise ValueError("the sketch is smaller than the K buffer or coded with other bits / block than the plan's")
    g = ws.g
    # codes: fp16 operands on the GPU (2 parts of q * step); fp32 keys in the interpreter stay fp32.
    # exact keys (rows shorter than a block): as stored, q in 2 fp16 or 3 bf16 parts
    split_c = 2 if query.device.type == "cuda" or key.dtype != torch.float32 else 0
    split_k = {torch.float16: 2, torch.bfloat16: 3}.get(key.dtype, 0)
    # the split statistics feed logZ, read by the selection keys (g > 1) and the reallocation only
    stats = g > 1 or bool(ws.config.reallocate)
    stages = None if query.device.type != "cuda" else (ws.score_stages or ws.tuning.sketch_stages)
    _sketch_scores_kernel[(batch * num_kv_heads, ws.n_split1)](
        query, sketch.codes, sketch.lo, sketch.hi, key, lengths, starts, starts if slots is None else slots,
        ws.logits, ws.split_m, ws.split_l, ws.sample_buf,
        key.stride(0), key.stride(1), key.stride(2),
        num_kv_heads, ws.capacity, sketch.capacity, sketch.n_blocks, ws.n_split1, ws.sample_buf.shape[-1], float(scale),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), GQ=max(4, triton.next_power_of_2(g)), D=head_dim,
        BITS=sketch.bits, BLOCK=sketch.block, CHUNK=ws.chunk1, BLOCK_S=sketch_block_s(ws, sketch),
        HAS_STARTS=has_starts, HAS_SLOTS=slots is not None, SPLIT_C=split_c, SPLIT_K=split_k, STATS=stats,
        ASM=query.device.type == "cuda", SMP_SHIFT=ws.sample_shift,
        num_warps=ws.score_warps, **({"num_stages": stages} if stages else {}), **ws.sketch_opts,
        PDL=ws.pdl, **ws.launch_opts,
    )
