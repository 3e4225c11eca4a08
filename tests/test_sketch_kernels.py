"""`sparq-sketch` on the Triton kernels against its PyTorch reference (`methods/sketch.py`).

Without CUDA the kernels run in Triton's interpreter on the CPU (fp32 and fp16); with CUDA on the
GPU (fp16 and bf16, larger shapes). Every case draws fresh random inputs: odd S, ragged lengths,
left-padded rows (starts), rows shorter than one block (scored from exact keys). Selection
differences may only come from rounding at near-ties: those rows are counted, checked to be
near-ties of the reference's scores and their error bounded; every other row must match to the
dtype's tolerance.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from sparq import kernels, reference  # noqa: E402
from sparq.api import valid_mask  # noqa: E402
from sparq.methods._common import grouped  # noqa: E402
from sparq.methods.base import DecodeInputs  # noqa: E402
from sparq.methods.sketch import SparQSketch, key_sketch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="Triton kernels unavailable")

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _imports():
    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan
    from sparq.kernels.select import _budgets_kernel
    from sparq.kernels.sketch_scores import SketchConfig
    from sparq.kernels.sketch_state import SketchState

    return DEFAULT_TUNING, DecodePlan, SketchConfig, SketchState, _budgets_kernel


def _rows(batch, seq, gen, block, padded):
    """Ragged lengths (row 0 full, the last shorter than one block when there is room) and, when
    padded, left-padding offsets with starts + lengths <= seq."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    if batch > 2 and seq > 2 * block:  # a second row with finished blocks, not at the end
        lengths[1] = int(torch.randint(2 * block, seq, (), generator=gen))
    if batch > 1:
        lengths[-1] = int(torch.randint(1, min(block, seq) + 1, (), generator=gen))
    starts = torch.zeros(batch, dtype=torch.long)
    if padded:
        for b in range(1, batch):
            starts[b] = int(torch.randint(0, seq - int(lengths[b]) + 1, (), generator=gen))
    return lengths, starts


def _valid(lengths, starts, batch, seq):
    return valid_mask(lengths.to(DEVICE), batch, seq, DEVICE, starts.to(DEVICE))


# ---------------------------------------------------------------------------------------- state

@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_is_key_sketch(bits, block, dtype):
    """The dequantised state equals key_sketch on every row with a finished block (exactly: same
    fp32 operations), and the ranges are the exact min / max of each finished block."""
    _, _, _, SketchState, _ = _imports()
    gen = torch.Generator().manual_seed(100 * bits + block)
    batch, hkv, seq, d = 4, 2, 101, 32
    key = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    lengths, starts = _rows(batch, seq, gen, block, padded=True)
    st = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=dtype, device=DEVICE)
    st.prefill(key, lengths.to(DEVICE), starts.to(DEVICE))
    ref = key_sketch(key, _valid(lengths, starts, batch, seq), bits, block)
    deq = st.dequantised(lengths)
    checked = 0
    for b in range(batch):
        n, s0 = int(lengths[b]), int(starts[b])
        n_full = n // block
        if n_full == 0:
            continue
        assert torch.equal(deq[b, :, :n], ref[b, :, s0:s0 + n]), b
        blocks = key[b, :, s0:s0 + n_full * block].float().reshape(hkv, n_full, block, d)
        assert torch.equal(st.lo[b, :, :n_full].float(), blocks.amin(2))
        assert torch.equal(st.hi[b, :, :n_full].float(), blocks.amax(2))
        checked += 1
    assert checked >= 2
    # 1 or 2 bits per element: the codes take d * bits / 32 words per position
    assert st.codes.shape[-1] == d * bits // 32
    # a prefill in chunks of one block (its temporaries bounded by the chunk) builds the same state
    small = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=dtype, device=DEVICE)
    small.prefill(key, lengths.to(DEVICE), starts.to(DEVICE), chunk_elements=1)
    for name in ("codes", "lo", "hi"):
        assert torch.equal(getattr(small, name), getattr(st, name)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_append_codes_many_keys_like_prefill(dtype):
    """1M key elements coded by the append kernel (64 blocks finished by one append) and 8k by its
    single-position path give the PyTorch prefill's codes bit for bit. On the GPU this needs the
    prefill's step (hi - lo) / 3 to be a true division: PyTorch's CUDA division by a Python scalar
    multiplies by the reciprocal, and 1-13 of 2048 code words differed from the kernel's (found by the
    GPU fuzz)."""
    _, _, _, SketchState, _ = _imports()
    gen = torch.Generator().manual_seed(11)
    batch, hkv, d, block = 8, 8, 128, 128
    seq = 2 * block + 2
    key = (torch.randn(batch, hkv, seq, d, generator=gen) * 3).to(DEVICE, dtype)
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 keys take the PyTorch path on the CPU (sketch_supported)")
    for first in (block - 1, 2 * block):  # the append finishes block 0 / codes position 256 with block 1's range
        a = SketchState(batch, hkv, d, seq, bits=2, block=block, dtype=dtype, device=DEVICE)
        a.prefill(key, torch.full((batch,), first, device=DEVICE))
        pos = torch.full((batch,), first, device=DEVICE)
        a.append(key[:, :, first].contiguous(), key, pos)
        full = SketchState(batch, hkv, d, seq, bits=2, block=block, dtype=dtype, device=DEVICE)
        full.prefill(key, pos + 1)
        assert torch.equal(a.codes[:, :, : first + 1], full.codes[:, :, : first + 1]), first
        assert torch.equal(a.lo, full.lo) and torch.equal(a.hi, full.hi), first


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_append_equals_prefill(bits, dtype):
    """Prefill + N appends (one launch per step) gives the state of a prefill of the whole
    sequence: codes bitwise, ranges exact; rows cross block boundaries, one row finishes its
    first block during the appends, rows are left-padded."""
    _, _, _, SketchState, _ = _imports()
    block, steps = 16, 21
    gen = torch.Generator().manual_seed(7 + bits)
    batch, hkv, seq, d = 4, 2, 90, 64
    key = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    start_len = torch.tensor([45, 10, 33, 3])  # 10 + 21 = 31 crosses 16; 3 + 21 = 24 too
    starts = torch.tensor([0, 40, 2, 60])
    final = start_len + steps
    assert bool((starts + final <= seq).all())
    a = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=dtype, device=DEVICE)
    a.prefill(key, start_len.to(DEVICE), starts.to(DEVICE))
    lengths = start_len.clone().to(DEVICE)
    rows = torch.arange(batch, device=DEVICE)
    for _ in range(steps):
        new = key[rows, :, (starts.to(DEVICE) + lengths)]  # [B, Hkv, d]: as if just appended
        a.append(new.contiguous(), key, lengths, starts.to(DEVICE))
        lengths = lengths + 1
    b_ = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=dtype, device=DEVICE)
    b_.prefill(key, final.to(DEVICE), starts.to(DEVICE))
    for b in range(batch):
        n = int(final[b])
        n_full = n // block
        assert n_full >= 1
        assert torch.equal(a.codes[b, :, :n], b_.codes[b, :, :n]), b
        assert torch.equal(a.lo[b, :, :n_full], b_.lo[b, :, :n_full]), b
        assert torch.equal(a.hi[b, :, :n_full], b_.hi[b, :, :n_full]), b
    # and what the scorer will see is key_sketch of the whole sequence
    ref = key_sketch(key, _valid(final, starts, batch, seq), bits, block)
    deq = a.dequantised(final)
    for b in range(batch):
        n, s0 = int(final[b]), int(starts[b])
        assert torch.equal(deq[b, :, :n], ref[b, :, s0:s0 + n])


def test_finished_block_is_never_rewritten():
    """Appends after a block finished leave its codes and range untouched, even when later keys
    are far outside its range (they are clamped into the newest block's codes instead)."""
    _, _, _, SketchState, _ = _imports()
    block, d = 16, 32
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(1, 1, 64, d, generator=gen).to(DEVICE)
    key[:, :, 20:] *= 50.0
    st = SketchState(1, 1, d, 64, bits=2, block=block, dtype=torch.float32, device=DEVICE)
    st.prefill(key, torch.tensor([16], device=DEVICE))
    codes0, lo0, hi0 = st.codes[:, :, :16].clone(), st.lo[:, :, 0].clone(), st.hi[:, :, 0].clone()
    for n in range(16, 40):
        st.append(key[:, :, n].contiguous(), key, torch.tensor([n], device=DEVICE))
    assert torch.equal(st.codes[:, :, :16], codes0)
    assert torch.equal(st.lo[:, :, 0], lo0) and torch.equal(st.hi[:, :, 0], hi0)
    # positions 32..39 (unfinished block 2) are coded with block 1's range, clamped
    deq = st.dequantised(torch.tensor([40]))
    assert float(deq[0, 0, 32:40].max()) <= float(st.hi[0, 0, 1].max()) + 1e-6


# -------------------------------------------------------------------------------------- budgets

@pytest.mark.parametrize("fraction, bits, block, d, min_k", [
    (1 / 8, 2, 16, 64, 16), (1 / 16, 1, 32, 128, 1), (0.3, 2, 128, 32, 4), (1.0, 1, 16, 32, 16),
    (1 / 8, 1, 64, 128, 2),
])
def test_budgets_kernel_equals_method(fraction, bits, block, d, min_k):
    """k_b, local_b from the device kernel equal SparQSketch.k_for / local_for for every length
    (no SparQConfig reproduces them), and k_bound is their max."""
    _, _, SketchConfig, _, _ = _imports()
    m = SparQSketch(fraction, bits=bits, block=block, local_fraction=0.3, min_k=min_k)
    cfg = SketchConfig.from_method(m, d)
    n = 420 if not CUDA else 5000
    lengths = torch.arange(1, n + 1, dtype=torch.int32, device=DEVICE)
    DEFAULT_TUNING, DecodePlan, _, _, _ = _imports()
    plan = DecodePlan(n, 1, 1, d, n, cfg, DEVICE, torch.float16 if CUDA else torch.float32, DEFAULT_TUNING)
    plan.counts.fill_(1)
    _, _, _, _, kernel = _imports()
    kernel[(n,)](lengths, plan.budget_table, plan.k_b, plan.local_b, plan.counts, 1, H2_PAD=2, num_warps=1)
    k_b, local_b, counts = plan.k_b, plan.local_b, plan.counts
    want_k = [m.k_for(i, d) for i in range(1, n + 1)]
    assert k_b.tolist() == want_k
    assert local_b.tolist() == [m.local_for(k) for k in want_k]
    assert [cfg.k_for(i) for i in (1, n)] == [want_k[0], want_k[-1]]
    assert cfg.k_bound(n) == max(want_k)
    assert int(counts.abs().sum()) == 0


# -------------------------------------------------------------------------------- decode step

def _method_budgets(m, lengths, d):
    ks = [m.k_for(int(n), d) for n in lengths.tolist()]
    return ks, [m.local_for(k) for k in ks]


def compare(q, k, v, lengths, starts, m, plan, out):
    """Check the plan's kept sets and `out` against SparQSketch.attend; returns
    (rows, flipped rows, max relative error of a flipped row)."""
    batch, hq, d = q.shape
    hkv, seq = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    valid = _valid(lengths, starts, batch, seq)
    ref = m.attend(DecodeInputs(q.float(), k.float(), v.float(), valid, scale)).float().cpu()
    s_hat = m.approx_scores(DecodeInputs(q.float(), k.float(), v.float(), valid, scale)).cpu()
    ks, locals_ = _method_budgets(m, lengths, d)
    k_t, l_t = torch.tensor(ks), torch.tensor(locals_)
    ref_keep = reference.select_topk(s_hat.sum(2), valid.cpu(), k_t, l_t)  # [B, Hkv, S]
    assert plan.k_b.cpu().tolist() == ks and plan.local_b.cpu().tolist() == locals_
    idx, counts = plan.idx.cpu(), plan.counts[:, 0].cpu()
    ours = torch.zeros_like(ref_keep)
    for b in range(batch):
        n, s0 = int(lengths[b]), int(starts[b])
        for h in range(hkv):
            sel = idx[b * hkv + h, : ks[b]].long()
            assert int(counts[b * hkv + h]) == ks[b], "kept count differs from k_b"
            if plan.deterministic:
                assert bool((sel[1:] > sel[:-1]).all()), "kept positions not strictly ascending"
            assert sel.unique().numel() == sel.numel(), "a position was kept twice"
            assert bool((sel >= 0).all()) and bool((sel < n).all()), "kept a padding position"
            ours[b, h, sel + s0] = True
    out = out.float().cpu()
    err = (out - ref).reshape(batch, hkv, g, d)
    rel = err.norm(dim=-1) / ref.reshape(batch, hkv, g, d).norm(dim=-1).clamp_min(1e-6)
    flipped = (ours != ref_keep).any(-1)
    score = s_hat.sum(2)
    for b, h in flipped.nonzero().tolist():
        only_ours = score[b, h][ours[b, h] & ~ref_keep[b, h]]
        only_ref = score[b, h][ref_keep[b, h] & ~ours[b, h]]
        gap = (only_ref.max() - only_ours.min()).item()
        assert gap <= 1e-4 * max(only_ref.max().item(), 1e-30) + 1e-7, f"selection differs beyond a near-tie ({gap})"
    ok_rows = ~flipped[:, :, None].expand_as(rel)
    assert torch.isfinite(out).all()
    if ok_rows.any():
        assert float(rel[ok_rows].max()) <= TOL[q.dtype], float(rel[ok_rows].max())
    max_flip = float(rel[~ok_rows].max()) if (~ok_rows).any() else 0.0
    assert max_flip <= 0.1, max_flip
    return int(flipped.numel()), int(flipped.sum()), max_flip


def check_logits(q, k, lengths, starts, bits, block, plan):
    """Step 1 alone: the plan's logits are q . key_sketch * scale on every valid position."""
    batch, hq, d = q.shape
    hkv, seq = k.shape[1], k.shape[2]
    valid = _valid(lengths, starts, batch, seq)
    ks = key_sketch(k, valid, bits, block)
    want = (grouped(q, hkv) @ ks.transpose(-1, -2)).cpu() / math.sqrt(d)  # [B, Hkv, g, S]
    got = plan.logits.cpu().view(batch, hkv, hq // hkv, -1)
    for b in range(batch):
        n, s0 = int(lengths[b]), int(starts[b])
        w, o = want[b, :, :, s0:s0 + n], got[b, :, :, :n]
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def run_case(batch, hq, hkv, seq, d, dtype, bits, block, fraction, realloc, padded, seed, tuning, min_k=4,
             plans_out=None):
    DEFAULT_TUNING, DecodePlan, SketchConfig, SketchState, _ = _imports()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    lengths, starts = _rows(batch, seq, gen, block, padded)
    m = SparQSketch(fraction, bits=bits, block=block, local_fraction=0.25, reallocate=realloc, min_k=min_k)
    st = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=dtype, device=DEVICE)
    st.prefill(k, lengths.to(DEVICE), starts.to(DEVICE))
    plan = DecodePlan(batch, hq, hkv, d, seq, SketchConfig.from_method(m, d), DEVICE, dtype, tuning or DEFAULT_TUNING)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    plan.run(q, k, v, lengths.to(DEVICE), starts=starts.to(DEVICE) if padded else None, out=out, sketch=st)
    check_logits(q, k, lengths, starts, bits, block, plan)
    if plans_out is not None:
        plans_out.append((plan, lengths))
    return compare(q, k, v, lengths, starts, m, plan, out)


@pytest.fixture(params=[True, False], ids=["det", "atomic"])
def det(request):
    from sparq.kernels.dispatch import DEFAULT_TUNING

    return DEFAULT_TUNING.with_(deterministic=request.param)


CPU_CASES = [
    # batch, hq, hkv, S, d, dtype, bits, block, fraction, reallocate, left-padded
    (3, 4, 4, 151, 32, torch.float32, 2, 16, 0.3, True, True),     # MHA, several blocks
    (3, 6, 2, 133, 64, torch.float16, 1, 32, 0.25, False, True),   # GQA g=3, 1 bit
    (2, 8, 2, 97, 128, torch.float32, 1, 16, 0.4, True, False),    # g=4, d=128
    (3, 4, 1, 29, 32, torch.float16, 2, 32, 0.3, True, True),      # every row below one block: exact keys
]

GPU_CASES = [
    (b, hkv * g, hkv, s, d, dt, bits, block, frac, realloc, True)
    for (b, g, hkv, s, d) in [(3, 1, 4, 4099, 128), (2, 3, 3, 2053, 64), (4, 4, 2, 8191, 128), (5, 1, 2, 777, 64)]
    for dt in (torch.float16, torch.bfloat16)
    for (bits, block, frac, realloc) in [(2, 128, 1 / 8, True), (1, 64, 1 / 16, False)]
]


@pytest.mark.parametrize("case", GPU_CASES if CUDA else CPU_CASES)
def test_sketch_step_matches_reference(case, det):
    batch, hq, hkv, seq, d, dtype, bits, block, frac, realloc, padded = case
    for seed in (0, 1) if CUDA else (0,):
        rows, flipped, _ = run_case(batch, hq, hkv, seq, d, dtype, bits, block, frac, realloc, padded, seed, det)
        assert flipped <= max(1, rows // 4), f"{flipped}/{rows} rows flipped"


@pytest.mark.parametrize("case", [CPU_CASES[1], CPU_CASES[3]], ids=["sketch", "exact-keys"])
def test_scorer_copies_the_selection_sample(case):
    """A plan whose sample is every stride-th candidate (stride 16 for 133 positions, 2 for 29): the
    scorer's compact copy holds exactly those logits of every row (from the sketch loop and from
    the exact-key loop of rows shorter than a block), and the step still matches the reference."""
    from sparq.kernels.dispatch import DEFAULT_TUNING

    batch, hq, hkv, seq, d, dtype, bits, block, frac, realloc, padded = case
    got = []
    rows, flipped, _ = run_case(batch, hq, hkv, seq, d, dtype, bits, block, frac, realloc, padded, 0,
                                DEFAULT_TUNING.with_(samples=16, select_cap=4096), plans_out=got)
    assert flipped <= max(1, rows // 4)
    plan, lengths = got[0]
    stride = plan.sample_stride
    assert plan.sample_copy and stride == (16 if seq > 100 else 2)
    lg, smp = plan.logits.cpu(), plan.sample_buf.cpu()
    for bh in range(batch * hkv):
        n = int(lengths[bh // hkv])
        want = lg[bh, :, 0:n:stride]
        assert torch.equal(smp[bh, :, : want.shape[-1]], want), bh


def test_k_one_and_keep_everything():
    """k = 1 (no local window: round(0.25) = 0) keeps each KV head's best position; fraction 1
    keeps everything and is dense attention."""
    rows, flipped, _ = run_case(2, 4, 2, 67, 32, torch.float32, 2, 16, 1e-6, False, True, seed=4, tuning=None,
                                min_k=1)
    assert flipped <= 1
    _, DecodePlan, SketchConfig, SketchState, _ = _imports()
    gen = torch.Generator().manual_seed(9)
    batch, hq, hkv, seq, d = 2, 6, 2, 45, 32
    q = torch.randn(batch, hq, d, generator=gen).to(DEVICE)
    k = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE)
    v = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE)
    lengths = torch.tensor([45, 30], device=DEVICE)
    for realloc in (True, False):
        m = SparQSketch(1.0, bits=1, block=16, reallocate=realloc)
        st = SketchState(batch, hkv, d, seq, bits=1, block=16, dtype=torch.float32, device=DEVICE)
        st.prefill(k, lengths)
        plan = DecodePlan(batch, hq, hkv, d, seq, SketchConfig.from_method(m, d), DEVICE, torch.float32)
        out = plan.run(q, k, v, lengths, sketch=st)
        valid = valid_mask(lengths, batch, seq, DEVICE)
        dense = reference.dense_reference(q, k, v, valid, 1 / math.sqrt(d))
        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)
        assert plan.k_b.tolist() == lengths.tolist()


def test_step_after_appends():
    """Decode loop shape: prefill, then a few (append to K/V, append to the sketch, step); each
    step matches the reference on the grown sequence, across a block boundary."""
    DEFAULT_TUNING, DecodePlan, SketchConfig, SketchState, _ = _imports()
    gen = torch.Generator().manual_seed(11)
    batch, hq, hkv, seq, d, block = 2, 4, 2, 48, 32, 16
    k = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE)
    v = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE)
    starts = torch.tensor([0, 5])
    lengths = torch.tensor([29, 13])
    m = SparQSketch(0.3, bits=2, block=block, min_k=4)
    st = SketchState(batch, hkv, d, seq, bits=2, block=block, dtype=torch.float32, device=DEVICE)
    st.prefill(k, lengths.to(DEVICE), starts.to(DEVICE))
    from sparq.kernels.dispatch import sparq_decode
    from sparq.kernels.plans import PlanCache

    plans = PlanCache(growth=False)  # the cache-owned plan, as the decode loops will hold it
    cfg = SketchConfig.from_method(m, d)
    rows = torch.arange(batch)
    for _ in range(5):  # 29 -> 34 crosses 32, 13 -> 18 finishes the first block
        new = k[rows, :, starts + lengths].to(DEVICE)
        st.append(new.contiguous(), k, lengths.to(DEVICE), starts.to(DEVICE))
        lengths = lengths + 1
        q = torch.randn(batch, hq, d, generator=gen).to(DEVICE)
        out = sparq_decode(q, k, v, cfg, lengths.to(DEVICE), starts=starts.to(DEVICE), plans=plans, sketch=st)
        plan = plans.get(q, k, cfg)
        check_logits(q, k, lengths, starts, 2, block, plan)
        compare(q, k, v, lengths, starts, m, plan, out)
    assert plans.created == 1


def test_wrong_logits_are_caught():
    """The comparison can fail: a sketch with one block's range perturbed gives other logits."""
    DEFAULT_TUNING, DecodePlan, SketchConfig, SketchState, _ = _imports()
    gen = torch.Generator().manual_seed(12)
    batch, hq, hkv, seq, d = 1, 2, 1, 40, 32
    q = torch.randn(batch, hq, d, generator=gen).to(DEVICE)
    k = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE)
    v = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE)
    lengths, starts = torch.tensor([40]), torch.tensor([0])
    m = SparQSketch(0.3, bits=2, block=16, min_k=4)
    st = SketchState(batch, hkv, d, seq, bits=2, block=16, dtype=torch.float32, device=DEVICE)
    st.prefill(k, lengths.to(DEVICE))
    st.hi[0, 0, 1] += 0.5
    plan = DecodePlan(batch, hq, hkv, d, seq, SketchConfig.from_method(m, d), DEVICE, torch.float32)
    plan.run(q, k, v, lengths.to(DEVICE), sketch=st)
    with pytest.raises(AssertionError):
        check_logits(q, k, lengths, starts, 2, 16, plan)


def test_growing_cache_keeps_the_sketch_across_regrowth():
    """transformers' growing cache (SparQCache's per-layer state): after a left-padded prefill, decode
    steps past the state's first capacity regrow Kᵀ-less state and sketch in place; the sketch then
    equals a fresh prefill's of the whole sequence (codes bitwise, ranges exact), and every step's
    state stays lined up (lengths, starts)."""
    from sparq.caches.dynamic import build_state, extend_state
    from sparq.kernels.sketch_state import SketchState

    gen = torch.Generator().manual_seed(9)
    dtype = torch.float16 if CUDA else torch.float32
    b, h, d, s0, steps, block = 2, 2, 32, 20, 75, 16
    key = torch.randn(b, h, s0 + steps, d, generator=gen).to(DEVICE, dtype)
    value = torch.randn_like(key)
    valid = torch.ones(b, s0 + steps, dtype=torch.bool, device=DEVICE)
    valid[1, :7] = False  # row 1 left-padded by 7
    st = build_state(key[:, :, :s0], value[:, :, :s0], valid[:, :s0], keep_key_t=False, sketch_spec=(2, block))
    first_capacity = st.derived.capacity
    assert st.sketch is not None and st.derived.key_t_buf is None
    for n in range(s0 + 1, s0 + steps + 1):
        extend_state(st, key[:, :, :n], value[:, :, :n], valid[:, n - 1])
    assert st.derived.capacity > first_capacity and st.sketch.capacity == st.derived.capacity  # it regrew
    assert st.lengths.tolist() == [s0 + steps, s0 + steps - 7] and st.starts.tolist() == [0, 7]
    fresh = SketchState(b, h, d, st.sketch.capacity, bits=2, block=block, dtype=dtype, device=DEVICE)
    fresh.prefill(key, st.lengths, st.starts)
    n = s0 + steps
    assert torch.equal(st.sketch.codes[:, :, :n], fresh.codes[:, :, :n])
    done = n // block
    assert torch.equal(st.sketch.lo[:, :, :done], fresh.lo[:, :, :done])
    assert torch.equal(st.sketch.hi[:, :, :done], fresh.hi[:, :, :done])


@pytest.mark.parametrize("d,bits,g,block", [(16, 2, 1, 16), (32, 1, 8, 16), (32, 2, 1, 16), (64, 1, 1, 16),
                                            (64, 2, 8, 16), (128, 1, 8, 16), (128, 2, 1, 16), (256, 1, 1, 16),
                                            (256, 2, 8, 16), (128, 2, 8, 128), (256, 1, 8, 64),
                                            (64, 2, 3, 128)])
def test_scorer_every_head_dim(d, bits, g, block):
    """Step 1 alone at every head dim and bits the sketch supports (the interleaved code layout has
    whole words per MMA lane only from d * bits = 128 on): logits, and the split statistics when
    something reads them (g > 1 or reallocation; g = 1 runs without reallocation, statistics off).
    Blocks of 64 / 128 give tiles of 64 / 128 positions: at g >= 8 the GPU's MMA is then a wgmma,
    whose own column order of the codes `_unpack_codes(WG=1)` produces. (64, 2, 3, 128): the default
    method at the bundled SmolLM2's shape (test_cli runs its demo on the PyTorch path)."""
    DEFAULT_TUNING, DecodePlan, SketchConfig, SketchState, _ = _imports()
    batch, hkv, seq = 2, 1, 53 if block == 16 else 2 * block + 37
    dtype = torch.float16
    gen = torch.Generator().manual_seed(d * 10 + bits + g)
    q = torch.randn(batch, hkv * g, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    lengths, starts = torch.tensor([seq, seq - 16]), torch.tensor([0, 9])
    m = SparQSketch(0.3, bits=bits, block=block, local_fraction=0.25, reallocate=g > 1, min_k=4)
    st = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=dtype, device=DEVICE)
    st.prefill(k, lengths.to(DEVICE), starts.to(DEVICE))
    plan = DecodePlan(batch, hkv * g, hkv, d, seq, SketchConfig.from_method(m, d), DEVICE, dtype, DEFAULT_TUNING)
    plan.run(q, k, v, lengths.to(DEVICE), starts=starts.to(DEVICE), out=torch.empty_like(q), sketch=st)
    check_logits(q, k, lengths, starts, bits, block, plan)
    if g > 1:
        logits = plan.logits.cpu().view(batch * hkv, g, -1)
        for bh in range(batch * hkv):
            n = int(lengths[bh // hkv])
            for p in range(plan.n_split1):
                x = logits[bh, :, p * plan.chunk1: min((p + 1) * plan.chunk1, n)]
                if x.shape[-1] == 0:
                    continue
                mx = x.max(-1).values
                torch.testing.assert_close(plan.split_m.cpu()[bh, :, p], mx)
                torch.testing.assert_close(plan.split_l.cpu()[bh, :, p], torch.exp(x - mx[:, None]).sum(-1))
