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
from sm90 import compile_for_sm90  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="Triton kernels unavailable")
PAGE = 32  # the paged cache's block size (a multiple of the sketch block)


def packed_batch(decode_lengths: list[int], hq: int, hkv: int, d: int, block: int, dtype: torch.dtype, seed: int,
                 bits: int = 2):
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
    plan = serving._plan(torch.tensor(cu_q, device=DEVICE), torch.tensor(cu_k, device=DEVICE), n_k, DEVICE)
    sk = PagedSketch(hkv, d, bits, block, dtype, DEVICE)
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


@pytest.mark.parametrize("bits, d, block, dtype, paged", [
    (2, 64, 16, torch.float16, False), (1, 128, 32, WIDE, True), (2, 32, 16, WIDE, True),
    (1, 64, 16, torch.float16, True), (2, 128, 32, torch.float16, False), (2, 256, 16, WIDE, True),
    (2, 16, 16, torch.float16, True), (2, 128, 128, WIDE, True),  # the smallest head_dim; the default block
])
def test_tail_codes_kernel_equals_its_pytorch_spec(monkeypatch, bits, d, block, dtype, paged):
    """`code_tail` (one launch per layer: each decode request's unfinished sketch block coded with its
    last finished block's range) writes the step sketch the PyTorch path writes, word for word, for
    rows shorter than a block, ending on a block boundary, one past it and mid-block; keys read from
    the packed read or through the pages (shuffled; NaN outside them)."""
    from sparq.caches import paged as paged_mod

    lengths = [5, 2 * block, 3 * block + 1, 70, 4 * block - 1]
    query, key, value, slots, plan, sk = packed_batch(lengths, 4, 2, d, block, dtype, seed=bits + d + block, bits=bits)
    batch = 8  # padded like `_decode_kernels` (1-key rows)
    starts, lens, _, _ = serving._kernel_rows(plan, batch, DEVICE)
    longest = max(plan.lengths)
    capacity = -(-longest // block) * block + block
    k = paged_cache(key, slots) if paged else key
    states = {}
    for on in (True, False):
        monkeypatch.setattr(paged_mod, "TAIL_KERNEL", on)
        st = paged_mod.step_state(sk, k, slots, starts, lens, longest, capacity, paged_mod.StepBuffers(), paged=paged)
        assert st is not None
        states[on] = st
    assert torch.equal(states[True].codes, states[False].codes)
    assert torch.equal(states[True].lo, states[False].lo) and torch.equal(states[True].hi, states[False].hi)
    # the coded tail positions hold codes (not the zeros of the fresh buffer) somewhere
    n_full = lens // block
    assert any(int(n_full[r]) and int(lens[r]) % block for r in range(len(plan.lengths)))


def paged_cache(packed: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The packed read [K, Hkv, d] put back at its physical slots of a paged cache [num_slots, Hkv, d];
    every other row is NaN, so a kernel reading a wrong row makes the output NaN."""
    cache = torch.full((int(slots.max()) + 1 + PAGE, *packed.shape[1:]), float("nan"), dtype=packed.dtype,
                       device=packed.device)
    cache[slots] = packed
    return cache


@pytest.mark.parametrize("case, slot_dtype", [(c, (torch.int64, torch.int32)[i % 2]) for i, c in enumerate(CASES)],
                         ids=lambda c: f"g{c[0] // c[1]}-d{c[2]}-{str(c[3])[6:]}-f{c[4]:.3g}" if isinstance(c, tuple)
                         else str(c)[6:])
def test_kernels_through_the_pages_equal_the_packed_read(case, slot_dtype):
    """Decode-only batches read K, V (and the unfinished sketch block's keys) from the paged cache
    through the slot map (`paged=True`: `DecodePlan.run(slots=...)`), shuffled pages: the output is
    the packed read's exactly (the same values in the same order) and the PyTorch spec's. Slots as
    int64 (what transformers hands over) or int32, alternately over the cases."""
    hq, hkv, d, dtype, fraction, realloc, min_k = case
    block = 16
    lengths = [5, 16, 70, 33, 131]
    query, key, value, slots, plan, sk = packed_batch(lengths, hq, hkv, d, block, dtype, seed=hq + d + 1)
    m = SparQSketch(fraction, bits=2, block=block, local_fraction=0.0 if not realloc else 0.25,
                    reallocate=realloc, min_k=min_k)
    scale = 1.0 / math.sqrt(d)
    k_pages, v_pages = paged_cache(key, slots), paged_cache(value, slots)
    assert serving._kernels_for(m, query, k_pages, sk)
    route = serving._Route()
    packed = serving._decode_kernels(m, query, key, value, plan, scale, sk, slots, route)
    paged = serving._decode_kernels(m, query, k_pages, v_pages, plan, scale, sk, slots.to(slot_dtype), route,
                                    paged=True)
    assert paged is not None and route.runs == 2 and route.created == 1
    assert torch.isfinite(paged).all(), "a kernel read a row outside the requests' pages"
    assert torch.equal(paged, packed)
    close(paged, spec(m, query, key, value, plan, scale), dtype)


@pytest.mark.parametrize("hq", [8, 4], ids=["gqa-copied-sample", "mha-in-place-sample"])
def test_pages_with_a_strided_sample(hq):
    """A plan whose selection sample is every 16th candidate (forced small sample): for g > 1 the
    scorer copies it (also from rows shorter than a block, whose keys come through the pages), for
    g = 1 the sample kernel reads it in place; paged and packed reads give the same output as the
    PyTorch spec."""
    from sparq.kernels.dispatch import DEFAULT_TUNING

    hkv, d, dtype, block = 4, 64, torch.float32, 16
    lengths = [5, 16, 70, 33, 131]
    query, key, value, slots, plan, sk = packed_batch(lengths, hq, hkv, d, block, dtype, seed=11 + hq)
    m = SparQSketch(1 / 4, bits=2, block=block, local_fraction=0.0, reallocate=False, min_k=1)
    scale = 1.0 / math.sqrt(d)
    route = serving._Route(tuning=DEFAULT_TUNING.with_(samples=16, select_cap=4096))  # 256 positions: stride 16
    packed = serving._decode_kernels(m, query, key, value, plan, scale, sk, slots, route)
    paged = serving._decode_kernels(m, query, paged_cache(key, slots), paged_cache(value, slots), plan, scale, sk,
                                    slots, route, paged=True)
    (dplan,) = route.plans.values()
    assert dplan.sample_stride == 16 and dplan.sample_copy == (hq > hkv)
    if dplan.sample_copy:  # the copy holds every 16th logit of each request (the output cannot show it:
        # a wrong sample only widens the bracket, and the resolve stays exact)
        lg, smp = dplan.logits.cpu(), dplan.sample_buf.cpu()
        for b, n in enumerate(lengths):
            for h in range(hkv):
                want = lg[b * hkv + h, :, 0:n:16]
                assert torch.equal(smp[b * hkv + h, :, : want.shape[-1]], want), (b, h)
    assert paged is not None and torch.equal(paged, packed)
    close(paged, spec(m, query, key, value, plan, scale), dtype)


def test_slots_need_a_sketch_plan_starts_and_value_sums():
    from sparq.kernels.dispatch import DecodePlan
    from sparq.kernels.sketch_scores import SketchConfig

    m = SparQSketch(1 / 8, bits=2, block=16, local_fraction=0.25, reallocate=True, min_k=1)
    plan = DecodePlan(1, 2, 2, 64, 128, SketchConfig.from_method(m, 64), DEVICE, torch.float32)
    q = torch.zeros(1, 2, 64, device=DEVICE)
    kv = torch.zeros(1, 2, 200, 64, device=DEVICE)
    slots = torch.arange(200, device=DEVICE)
    lengths = torch.tensor([20], device=DEVICE)
    starts = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="slots need starts, max_length"):
        plan.run(q, kv, kv, lengths, slots=slots, starts=starts)  # no max_length
    with pytest.raises(ValueError, match="pass value_sum with slots"):
        plan.run(q, kv, kv, lengths, slots=slots, starts=starts, max_length=20)


COMPILE = '''
    from sparq.kernels.gather_attention import _gather_attention_kernel
    from sparq.kernels.sketch_scores import _sketch_scores_kernel

    gather = {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "idx_ptr": "*i32", "kcount_ptr": "*i32",
              "logits_ptr": "*fp32", "logz_ptr": "*fp32", "starts_ptr": "*i32", "slots_ptr": "*i64",
              "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "alpha_ptr": "*fp32",
              **ints("stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh", "stride_vs", "num_kv_heads",
                     "s_cap", "k_max", "n_split"), "scale": "fp32"}
    scores = {"q_ptr": "*fp16", "codes_ptr": "*i32", "lo_ptr": "*fp16", "hi_ptr": "*fp16", "key_ptr": "*fp16",
              "len_ptr": "*i32", "starts_ptr": "*i32", "slots_ptr": "*i64", "logits_ptr": "*fp32", "m_ptr": "*fp32",
              "l_ptr": "*fp32", "smp_ptr": "*fp32",
              **ints("stride_kb", "stride_kh", "stride_ks", "num_kv_heads", "s_cap", "code_cap", "n_blk_cap", "n_split",
                     "n_smp"), "scale": "fp32"}
    for slots in (False, True):
        for realloc in (False, True):
            build(_gather_attention_kernel, gather, {"G": 4, "G_PAD": 16, "D": 128, "CHUNK": 64, "BLOCK_N": 64,
                                                     "REALLOC": realloc, "HAS_STARTS": True, "HAS_SLOTS": slots}, 4)
        build(_sketch_scores_kernel, scores, {"G": 4, "G_PAD": 16, "GQ": 4, "D": 128, "BITS": 2, "BLOCK": 128,
                                              "CHUNK": 1024, "BLOCK_S": 128, "HAS_STARTS": True, "HAS_SLOTS": slots,
                                              "SPLIT_C": 2, "SPLIT_K": 2, "STATS": True, "ASM": True, "SMP_SHIFT": 4},
              4, num_stages=2, maxnreg=72)  # as a g = 4, d = 128 plan launches it (sample copy, register cap)
    print("compiled")
'''


def test_kernels_with_slots_compile_for_sm90():
    """The gather and the sketch scorer build for the H100/H200 (sm_90) with and without the slot map
    (the interpreter runs their Python, not their compiled form; tests/test_gpu_compile.py does the
    same for the selection kernels; tests/sm90.py)."""
    compile_for_sm90(COMPILE)
