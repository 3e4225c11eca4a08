"""Serving's kernels route (`serving._decode_kernels`): the default method's decode requests on the
Triton kernels, reading K/V in place from transformers' packed read (batch stride 0, per-row starts)
and the kept paged sketch through `caches.paged.step_state`, against the PyTorch specification
(`SparQSketch.attend` over each request's gathered keys/values, the sketch derived from its keys).

Fresh random packed batches, no transformers needed: ragged lengths (shorter than one sketch block,
exactly one block, several blocks), a prefill request between the decode requests (so offsets are
irregular), keys at shuffled physical pages. Without CUDA the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from sparq import kernels, serving  # noqa: E402
from sparq.caches.paged import PagedSketch  # noqa: E402
from sparq.methods.base import DecodeInputs  # noqa: E402
from sparq.methods.sketch import SparQSketch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="Triton kernels unavailable")
PAGE = 32  # the paged cache's block size (a multiple of the sketch block)


def packed_batch(decode_lengths: list[int], hq: int, hkv: int, d: int, block: int, dtype: torch.dtype, seed: int):
    """A step as `paged_attention_forward` sees it after `cache.update`: query [1, Hq, Q, d], the packed
    key/value [K, Hkv, d], the physical slot of every packed position, the batch plan, and the kept
    sketch holding every finished block of the decode requests. A 9-token prefill chunk of a 20-key
    request sits after the first decode request."""
    gen = torch.Generator().manual_seed(seed)
    reqs = [(1, n) for n in decode_lengths]
    reqs.insert(1, (9, 20))
    cu_q, cu_k = [0], [0]
    for nq, nk in reqs:
        cu_q.append(cu_q[-1] + nq)
        cu_k.append(cu_k[-1] + nk)
    n_q, n_k = cu_q[-1], cu_k[-1]
    query = torch.randn(1, hq, n_q, d, generator=gen).to(DEVICE, dtype)
    key = torch.randn(n_k, hkv, d, generator=gen).to(DEVICE, dtype)
    value = torch.randn(n_k, hkv, d, generator=gen).to(DEVICE, dtype)
    # every request's pages drawn from a shuffled pool: slots are contiguous only within a page
    n_pages = sum(-(-nk // PAGE) for _, nk in reqs)
    pool = torch.randperm(n_pages + 5, generator=gen).tolist()
    slots = []
    for _, nk in reqs:
        pages = [pool.pop() for _ in range(-(-nk // PAGE))]
        slots += [pages[p // PAGE] * PAGE + p % PAGE for p in range(nk)]
    slots_t = torch.tensor(slots, dtype=torch.long, device=DEVICE)
    plan = serving._plan(torch.tensor(cu_q, device=DEVICE), torch.tensor(cu_k, device=DEVICE), n_q, n_k,
                         dtype, DEVICE)
    sk = PagedSketch(hkv, d, 2, block, dtype, DEVICE)
    for s0, n in zip(plan.k_start, plan.lengths):
        nb = n // block
        if nb:
            idx = s0 + torch.arange(nb * block, device=DEVICE).view(nb, block)
            sk.write_blocks(key[idx], slots_t[idx])
    return query, key, value, slots_t, plan, sk


def spec(method: SparQSketch, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan, scale: float):
    """`SparQSketch.attend` on each decode request alone, fp32, its sketch derived from its keys."""
    outs = []
    for qp, s0, n in zip(plan.q_pos.tolist(), plan.k_start, plan.lengths):
        k = key[s0:s0 + n].float().transpose(0, 1)[None]
        v = value[s0:s0 + n].float().transpose(0, 1)[None]
        valid = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
        outs.append(method.attend(DecodeInputs(query[0, :, qp][None].float(), k, v, valid, scale))[0])
    return torch.stack(outs)


# the kernels take fp32 only in the interpreter and bf16 only on CUDA (the interpreter's bf16 is wrong)
WIDE = torch.bfloat16 if CUDA else torch.float32
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
CASES = [
    # hq, hkv, d, dtype, fraction, reallocate, min_k
    (4, 4, 64, WIDE, 1 / 8, False, 1),             # MHA, the default method's settings, k ~ 1-2
    (8, 2, 128, WIDE, 1 / 4, True, 2),             # GQA 4, d 128, reallocation (value sums)
    (4, 1, 64, torch.float16, 1 / 8, False, 1),    # GQA 4, fp16
    (2, 2, 128, WIDE, 1.0, True, 1),               # k >= length: everything kept
    (6, 2, 32, WIDE, 1 / 8, False, 1),             # GQA 3 (odd group), d 32
    (2, 1, 256, torch.float16, 1 / 8, False, 1),   # d 256 (Gemma 3's), GQA 2
]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """got [B, Hq, d] equals want to the dtype's tolerance (relative, per head). On CUDA up to 1/8 of
    the heads (at least one) may differ more: fp16/bf16 rounding can flip the selection at a near-tie
    (k is 1-2 here; tests/test_sketch_kernels.py allows 1/4), which the interpreter's cases never showed."""
    rel = (got.float() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)
    bad = int((rel > TOL[dtype]).sum())
    assert bad <= (max(1, rel.numel() // 8) if CUDA else 0), (bad, float(rel.max()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c[0] // c[1]}-d{c[2]}-{str(c[3])[6:]}-f{c[4]:.3g}")
def test_kernels_route_equals_the_pytorch_spec(case):
    hq, hkv, d, dtype, fraction, realloc, min_k = case
    block = 16
    # shorter than a block, exactly one block, several blocks, a block boundary plus one, longer
    lengths = [5, 16, 70, 33, 131]
    query, key, value, slots, plan, sk = packed_batch(lengths, hq, hkv, d, block, dtype, seed=hq + d)
    m = SparQSketch(fraction, bits=2, block=block, local_fraction=0.0 if not realloc else 0.25,
                    reallocate=realloc, min_k=min_k)
    scale = 1.0 / math.sqrt(d)
    assert serving._kernels_for(m, query, key, sk)
    k_before, v_before = key.clone(), value.clone()
    route = serving._Route()
    got = serving._decode_kernels(m, query, key, value, plan, scale, sk, slots, route)
    assert got is not None and route.runs == 1
    assert torch.equal(key, k_before) and torch.equal(value, v_before), "the kernels wrote into K/V"
    want = spec(m, query, key, value, plan, scale)
    close(got, want, dtype)
    # the PyTorch route of `_decode` (the kept sketch dequantised) gives the same
    close(serving._decode(m, query, key, value, plan, scale, sk, slots), want, dtype)
    # a second step over another batch reuses the plan and the buffers (5 rows pad to 8 both times)
    query2, key2, value2, slots2, plan2, sk2 = packed_batch([17, 3, 64, 40, 1], hq, hkv, d, block, dtype, seed=7)
    got2 = serving._decode_kernels(m, query2, key2, value2, plan2, scale, sk2, slots2, route)
    close(got2, spec(m, query2, key2, value2, plan2, scale), dtype)
    assert route.created == 1


def test_unknown_block_falls_back():
    """A finished block whose sketch is unknown (keys written by a step that did not keep it): no
    step sketch, the caller runs the PyTorch path."""
    query, key, value, slots, plan, sk = packed_batch([40, 7], 4, 4, 64, 16, torch.float32, seed=3)
    sk.invalidate(slots[plan.k_start[0]:plan.k_start[0] + 1])
    m = SparQSketch(1 / 8, bits=2, block=16, local_fraction=0.0, reallocate=False, min_k=1)
    assert serving._decode_kernels(m, query, key, value, plan, 0.125, sk, slots, serving._Route()) is None
