"""Step 1 of SparQ: approximate logits of every valid position.

The contract step 2 relies on (and nothing else): a scorer, given the plan (`dispatch.DecodePlan`,
written `ws` below), fills, for every KV head bh = b * Hkv + h_kv, query head j < g of its group and valid position
s < lengths[b]:
    ws.logits[bh, j, s]      fp32 approximate logit; s_hat = softmax over valid s of these
    ws.split_m[bh, j, p]     max of the logits of split p (-inf for an empty split)
    ws.split_l[bh, j, p]     sum of exp(logit - split_m) over split p (0 for an empty split)
where split p covers positions [p * ws.chunk1, (p + 1) * ws.chunk1). Positions >= lengths[b]
are never read by later steps, so a scorer may leave them unwritten.

`score_transposed_keys` is the paper's scorer: per KV head the r dimensions with the largest
|q| summed over the group, read from a transposed key copy K^T [B, Hkv, d, Smax] (contiguous along
the sequence), logits = q[i1] . K[:, i1]^T * scale / sqrt(||q[i1]||_1 / ||q||_1).
A later scorer (e.g. a packed low-bit key sketch read over all d dims) only has to provide the
same three outputs. Positions are logical: with left padding, row b's position s lives at
starts[b] + s of Kᵀ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import wait_for_previous

from .select import _in_sample



@triton.jit
def _transposed_key_scores_kernel(
    kt_ptr, qsel_ptr, fac_ptr, dims_ptr, len_ptr, starts_ptr,
    logits_ptr, m_ptr, l_ptr, smp_ptr,
    stride_kb, stride_kh, stride_kd,
    num_kv_heads, s_cap, kt_len, r, n_split, n_smp,
    G: tl.constexpr, G_PAD: tl.constexpr, R_PAD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, USE_DOT: tl.constexpr, HAS_STARTS: tl.constexpr,
    SMP_SHIFT: tl.constexpr = 0,
    PDL: tl.constexpr = False,
):
    """Approximate logits of one (batch, KV head) over one chunk of the sequence.

    s_cap is the workspace's row length (logits), kt_len Kᵀ's (reads stay inside it). Positions in
    [length, s_cap) of the last tile may be read and written (as -inf); never used.
    Reads  r * min(CHUNK, valid) * elt bytes of K^T (r rows, each contiguous along S), plus
           g*r*4 (selected query), g*4 (temperature factor), r*4 (dims) bytes.
    Writes 4 * g * (valid positions of the chunk) bytes of logits and 8 * g bytes of split stats;
    SMP_SHIFT > 0: also the logits of every 2^SMP_SHIFT-th position to smp [BH, g, n_smp] (the
    selection's sample, `select._sample_kernel`).
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    length = tl.load(len_ptr + b)

    offs_r = tl.arange(0, R_PAD)
    offs_g = tl.arange(0, G_PAD)
    offs_s = tl.arange(0, BLOCK_S)
    r_ok = offs_r < r
    g_ok = offs_g < G
    dims = tl.load(dims_ptr + bh * r + offs_r, mask=r_ok, other=0)
    q = tl.load(qsel_ptr + (bh * G + offs_g[:, None]) * r + offs_r[None, :],
                mask=g_ok[:, None] & r_ok[None, :], other=0.0)  # [G_PAD, R_PAD] fp32
    fac = tl.load(fac_ptr + bh * G + offs_g, mask=g_ok, other=0.0)  # [G_PAD]
    q_col = tl.load(qsel_ptr + bh * G * r + offs_r, mask=r_ok, other=0.0)[:, None]  # head 0, [R_PAD, 1]

    kt_base = kt_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    first = 0
    if HAS_STARTS:  # left padding: logical position s is column first + s of Kᵀ
        first = tl.load(starts_ptr + b)
        kt_base += first.to(tl.int64)
    row_ptr = kt_base + dims.to(tl.int64)[:, None] * stride_kd  # [R_PAD, 1]
    out_base = logits_ptr + (bh * G + offs_g).to(tl.int64)[:, None] * s_cap  # [G_PAD, 1]

    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    m_1 = tl.max(m_i, axis=0)  # g = 1: scalar running stats of query head 0
    l_1 = tl.sum(l_i, axis=0)
    fac_1 = tl.sum(tl.where(offs_g == 0, fac, 0.0), axis=0)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + offs_s
        s_ok = s < end
        if first + s0 + BLOCK_S <= kt_len:
            # whole tile inside the buffer: no mask, so the loads vectorise (padded rows read
            # row dims=0 and meet q=0; positions >= length are set to -inf below)
            kt = tl.load(row_ptr + s[None, :])
        else:
            kt = tl.load(row_ptr + s[None, :], mask=r_ok[:, None] & (first + s[None, :] < kt_len), other=0.0)
        if USE_DOT:
            if kt.dtype == tl.float32:
                acc = tl.dot(q, kt, input_precision="ieee")
            else:
                acc = tl.dot(q.to(kt.dtype), kt)  # q[i1] is exact in the cache dtype
        else:  # one query head per KV head: a plain reduction over the r rows
            acc = tl.sum(q_col * kt.to(tl.float32), axis=0)[None, :]
        if G == 1:  # epilogue on query head 0 only (the padded rows of the dot are dropped)
            logit = tl.sum(tl.where(offs_g[:, None] == 0, acc, 0.0), axis=0) * fac_1
            logit = tl.where(s_ok, logit, float("-inf"))
            if s0 + BLOCK_S <= s_cap:
                tl.store(logits_ptr + bh.to(tl.int64) * s_cap + s, logit)
            else:
                tl.store(logits_ptr + bh.to(tl.int64) * s_cap + s, logit, mask=s < s_cap)
            if SMP_SHIFT > 0:
                tl.store(smp_ptr + bh.to(tl.int64) * n_smp + (s >> SMP_SHIFT), logit,
                         mask=_in_sample(s, s_ok, SMP_SHIFT))
            m_new1 = tl.maximum(m_1, tl.max(logit, axis=0))
            l_1 = l_1 * tl.exp(m_1 - m_new1) + tl.sum(tl.exp(logit - m_new1), axis=0)
            m_1 = m_new1
        else:
            logit = acc * fac[:, None]
            logit = tl.where(s_ok[None, :], logit, float("-inf"))
            if s0 + BLOCK_S <= s_cap:
                tl.store(out_base + s[None, :], logit, mask=g_ok[:, None])
            else:
                tl.store(out_base + s[None, :], logit, mask=g_ok[:, None] & (s[None, :] < s_cap))
            if SMP_SHIFT > 0:
                tl.store(smp_ptr + (bh * G + offs_g).to(tl.int64)[:, None] * n_smp + (s >> SMP_SHIFT)[None, :], logit,
                         mask=g_ok[:, None] & _in_sample(s, s_ok, SMP_SHIFT)[None, :])
            m_new = tl.maximum(m_i, tl.max(logit, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
            m_i = m_new
    if G == 1:
        m_i = tl.where(offs_g == 0, m_1, m_i)
        l_i = tl.where(offs_g == 0, l_1, l_i)
    stat = (bh * G + offs_g) * n_split + split
    tl.store(m_ptr + stat, m_i, mask=g_ok)
    tl.store(l_ptr + stat, l_i, mask=g_ok)


@triton.jit
def _query_prep_kernel(q_ptr, dims_ptr, qsel_ptr, fac_ptr, r, scale,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, JB: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Per KV head: the r dims with the largest |q| summed over the group (ties: lower index),
    q[i1] per query head and the temperature factor scale / sqrt(||q[i1]||_1 / ||q||_1).

    Reads g * d * elt bytes of query; writes 4 * (r + g * r + g) bytes.
    """
    wait_for_previous(PDL)
    bh = tl.program_id(0)
    offs_d = tl.arange(0, D)
    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < G
    row = q_ptr + (bh * G) * D
    w = tl.zeros([D], tl.float32)
    for g in tl.static_range(G):  # sequential sum over the group, same order for every chunk
        w += tl.abs(tl.load(row + g * D + offs_d).to(tl.float32))
    rank = tl.zeros([D], tl.int32)
    offs_j = tl.arange(0, JB)
    for j0 in tl.static_range(0, D, JB):
        wj = tl.zeros([JB], tl.float32)
        for g in tl.static_range(G):
            wj += tl.abs(tl.load(row + g * D + j0 + offs_j).to(tl.float32))
        jj = j0 + offs_j
        beats = (wj[None, :] > w[:, None]) | ((wj[None, :] == w[:, None]) & (jj[None, :] < offs_d[:, None]))
        rank += tl.sum(beats.to(tl.int32), axis=1)
    sel = rank < r
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, 0) - sel_i
    tl.store(dims_ptr + bh * r + pos, offs_d, mask=sel)
    q = tl.load(row + offs_g[:, None] * D + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    tl.store(qsel_ptr + (bh * G + offs_g)[:, None] * r + pos[None, :], q, mask=g_ok[:, None] & sel[None, :])
    aq = tl.abs(q)
    q_l1 = tl.sum(aq, axis=1)
    sel_l1 = tl.sum(tl.where(sel[None, :], aq, 0.0), axis=1)
    tiny = 1.1754943508222875e-38
    ratio = tl.where(q_l1 > 0, sel_l1 / tl.maximum(q_l1, tiny), 1.0)
    ratio = tl.maximum(ratio, tiny)
    tl.store(fac_ptr + bh * G + offs_g, scale / tl.sqrt(ratio), mask=g_ok)


def score_transposed_keys(ws, query: torch.Tensor, key_t: torch.Tensor, lengths: torch.Tensor,
                          starts: torch.Tensor, has_starts: bool, scale: float) -> None:
    """Step 1 over K^T [B, Hkv, d, >= S] (contiguous along the sequence) into the plan's workspace.

    Bytes read per KV head: r * length * elt (the selected rows of K^T, contiguous) + g * d * elt
    (query); written: 4 * g * length (fp32 logits) + 8 * g * n_split (split statistics) + the
    selection's sample (4 * g * length / stride, when the plan's sample stride is > 1).
    """
    if key_t.dim() != 4 or (key_t.stride(-1) != 1 and key_t.shape[-1] > 1):
        raise ValueError("key_t must be [B, Hkv, d, S] and contiguous along the sequence")
    batch, num_kv_heads, head_dim, kt_len = key_t.shape
    g = ws.g
    r = ws.r
    _query_prep_kernel[(batch * num_kv_heads,)](
        query, ws.dims, ws.q_sel, ws.fac, r, float(scale),
        G=g, G_PAD=triton.next_power_of_2(g), D=head_dim, JB=min(head_dim, 32), num_warps=4, PDL=ws.pdl, **ws.launch_opts,
    )
    # tensor cores (exact products: q[i1] is exact in the cache dtype; fp32 sums), or for
    # g = 1 optionally a plain reduction over the r rows
    g_pad = max(16, triton.next_power_of_2(g)) if ws.use_dot else 1
    r_pad = max(16, triton.next_power_of_2(r))
    extra = {} if ws.score_stages is None else {"num_stages": ws.score_stages}
    return _transposed_key_scores_kernel[(batch * num_kv_heads, ws.n_split1)](
        key_t, ws.q_sel, ws.fac, ws.dims, lengths, starts,
        ws.logits, ws.split_m, ws.split_l, ws.sample_buf,
        key_t.stride(0), key_t.stride(1), key_t.stride(2),
        num_kv_heads, ws.capacity, kt_len, r, ws.n_split1, ws.sample_buf.shape[-1],
        G=g, G_PAD=g_pad, R_PAD=r_pad, CHUNK=ws.chunk1, BLOCK_S=ws.block_s,
        USE_DOT=ws.use_dot, HAS_STARTS=has_starts, SMP_SHIFT=ws.sample_shift, num_warps=ws.score_warps, **extra,
        PDL=ws.pdl, **ws.launch_opts,
    )
