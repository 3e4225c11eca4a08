"""Steps 2b and 3 of SparQ: exact attention over the kept rows (split-K), then the combine with
mean-value reallocation.

`_gather_attention_kernel`: one block per (KV head, slice of its kept-index list). The g query heads
of the group share every gathered K/V row, so each kept row is read once per KV head. Online
softmax over the slice; it also sums the step-1 probability mass s_hat of the kept positions
(alpha) from the logits step 1 wrote, so no second pass is needed.
`_combine_kernel`: one block per query head merges the slices (flash-decoding), and writes
out = alpha * y + (1 - alpha) * v_sum / length (alpha = 1 exactly when everything is kept,
or y alone when reallocation is off).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import wait_for_previous


@triton.jit
def _gather_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, kcount_ptr, logits_ptr, logz_ptr, starts_ptr, slots_ptr,
    m_ptr, l_ptr, acc_ptr, alpha_ptr,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    num_kv_heads, s_cap, k_max, n_split, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, REALLOC: tl.constexpr, HAS_STARTS: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Partial attention of one KV head's query group over one slice of its kept positions.

    Reads  (4 + 2 * d * elt) bytes per kept position of the slice (index, K row, V row), with
           slots the position's slot too (+ the slot map's element size, 4 or 8), and, with
           reallocation, 4 * g more (the step-1 logits of those positions); g * d * elt (q).
    Writes (8 + 4 * d + 4) * g bytes of partial results (m, l, acc, alpha).

    HAS_SLOTS (with HAS_STARTS; a paged cache): kept position p of row b is row
    slots[starts[b] + p] of K and V (their batch stride 0), so rows are read through the slot map.
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    kb = tl.load(kcount_ptr + b)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    q = tl.load(q_ptr + (bh * G + offs_g)[:, None] * D + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    if REALLOC:
        logz = tl.load(logz_ptr + bh * G + offs_g, mask=g_ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    if HAS_STARTS:
        first = tl.load(starts_ptr + b).to(tl.int64)
        if HAS_SLOTS:  # paged: row starts[b] + p of the slot map holds position p's row
            slot_row = slots_ptr + first
        else:  # left padding: kept (logical) position p is row starts[b] + p of K and V
            k_base += first * stride_ks
            v_base += first * stride_vs

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    a_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, kb)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        pos = tl.load(idx_ptr + bh.to(tl.int64) * k_max + n, mask=n_ok, other=0).to(tl.int64)
        if HAS_SLOTS:
            kv_row = tl.load(slot_row + pos, mask=n_ok, other=0).to(tl.int64)
        else:
            kv_row = pos
        k = tl.load(k_base + kv_row[:, None] * stride_ks + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + kv_row[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if k.dtype == tl.float32:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        s = tl.where(n_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        corr = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, axis=1)
        if v.dtype == tl.float32:
            acc = acc * corr[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        if REALLOC:
            lg = tl.load(logits_ptr + (bh * G + offs_g).to(tl.int64)[:, None] * s_cap + pos[None, :],
                         mask=g_ok[:, None] & n_ok[None, :], other=float("-inf"))
            a_i += tl.sum(tl.exp(lg - logz[:, None]), axis=1)
    row = (bh * G + offs_g) * n_split + split
    tl.store(m_ptr + row, m_i, mask=g_ok)
    tl.store(l_ptr + row, l_i, mask=g_ok)
    tl.store(alpha_ptr + row, a_i, mask=g_ok)
    tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, alpha_ptr, vsum_ptr, len_ptr, kcount_ptr, out_ptr,
    num_q_heads, n_split,
    G: tl.constexpr, D: tl.constexpr, NS_PAD: tl.constexpr, REALLOC: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Merge one query head's split partials and apply the reallocation.

    Reads n_split * (12 + 4 * d) bytes of partials and 4 * d bytes of v_sum; writes d * elt bytes.
    """
    wait_for_previous(PDL)
    row = tl.program_id(0)  # b * Hq + query head
    b = row // num_q_heads
    bh = row // G  # KV head row (b * Hkv + h_kv)
    offs_p = tl.arange(0, NS_PAD)
    offs_d = tl.arange(0, D)
    p_ok = offs_p < n_split
    m = tl.load(m_ptr + row * n_split + offs_p, mask=p_ok, other=float("-inf"))
    l = tl.load(l_ptr + row * n_split + offs_p, mask=p_ok, other=0.0)
    acc = tl.load(acc_ptr + (row * n_split + offs_p)[:, None] * D + offs_d[None, :], mask=p_ok[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    y = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    if REALLOC:
        length = tl.load(len_ptr + b)
        kb = tl.load(kcount_ptr + b)
        alpha = tl.sum(tl.load(alpha_ptr + row * n_split + offs_p, mask=p_ok, other=0.0), axis=0)
        alpha = tl.where(kb >= length, 1.0, alpha)
        v_mean = tl.load(vsum_ptr + bh * D + offs_d) / tl.maximum(length, 1).to(tl.float32)
        y = alpha * y + (1.0 - alpha) * v_mean
    tl.store(out_ptr + row * D + offs_d, y.to(out_ptr.dtype.element_ty))
