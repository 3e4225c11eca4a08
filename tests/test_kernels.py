"""The Triton SparQ kernels against the reference.

On a machine without CUDA the kernels run in Triton's interpreter on the CPU (fp32 and fp16;
bf16 arithmetic is broken there); with CUDA they run on the GPU (fp16 and bf16, more shapes).
Every case draws fresh random inputs with odd S and ragged lengths. Selection differences can
only come from rounding at near-ties: those rows are counted, checked to be near-ties and their
output error bounded; every other row must match to the dtype's tolerance.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from sparq import reference  # noqa: E402
from sparq.api import valid_mask  # noqa: E402
from sparq.config import SparQConfig  # noqa: E402
from sparq import kernels  # noqa: E402
import triton.language as tl  # noqa: E402
from sparq.kernels.select import _kth_largest_mp  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="Triton kernels unavailable")

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


@pytest.fixture(params=[True, False], ids=["det", "atomic"])
def det(request):
    """Both selection paths: deterministic (bitmap + ordered compaction, the default) and the
    atomic-order lists (Tuning.deterministic = False). The test gets the Tuning to plan with."""
    from sparq.kernels.dispatch import DEFAULT_TUNING

    return DEFAULT_TUNING.with_(deterministic=request.param)


def _plan(q, k, cfg, tuning=None):
    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan

    batch, hq, d = q.shape
    return DecodePlan(batch, hq, k.shape[1], d, k.shape[2], cfg, q.device, q.dtype, tuning or DEFAULT_TUNING)


def _case(batch, hq, hkv, seq, d, dtype, gen):
    q = torch.randn(batch, hq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, hkv, seq, d, generator=gen).to(DEVICE, dtype)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[0] = seq  # one full row
    return q, k, v, lengths.to(DEVICE)


def compare(q, k, v, lengths, cfg, out, ws_kept, deterministic=True):
    """Check `out` of the kernels against the reference; returns (n_rows, n_flipped, max_err_flipped)."""
    batch, hq, d = q.shape
    hkv, seq = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    valid = valid_mask(lengths, batch, seq, q.device)
    ref = reference.sparq_reference(q.float(), k.float(), v.float(), cfg, valid, scale)
    _, k_b, local_b = reference.budgets(cfg, valid)
    s_hat = reference.approx_scores(q.float(), k.float(), valid, cfg.r, scale)
    ref_keep = reference.select_topk(s_hat.sum(2), valid, k_b, local_b).cpu()  # [B, Hkv, S]
    s_hat, k_b, lengths = s_hat.cpu(), k_b.cpu(), lengths.cpu()

    idx, counts = ws_kept
    ours = torch.zeros_like(ref_keep)
    for b in range(batch):
        for h in range(hkv):
            sel = idx[b * hkv + h, : int(k_b[b])].long()
            assert int(counts[b * hkv + h]) == int(k_b[b]), "kept count differs from k_b"
            if deterministic:  # the kept-index list is in ascending position order
                assert bool((sel[1:] > sel[:-1]).all()), "kept positions not strictly ascending"
            assert sel.unique().numel() == sel.numel(), "a position was kept twice"
            assert bool((sel < lengths[b]).all()) and bool((sel >= 0).all()), "kept a padding position"
            ours[b, h, sel] = True
    out, ref = out.float().cpu(), ref.float().cpu()
    err = (out - ref).reshape(batch, hkv, g, d)
    rel = err.norm(dim=-1) / ref.reshape(batch, hkv, g, d).norm(dim=-1).clamp_min(1e-6)
    flipped = (ours != ref_keep).any(-1)  # [B, Hkv]
    score = s_hat.sum(2)
    for b, h in flipped.nonzero().tolist():
        only_ours = score[b, h][ours[b, h] & ~ref_keep[b, h]]
        only_ref = score[b, h][ref_keep[b, h] & ~ours[b, h]]
        gap = (only_ref.max() - only_ours.min()).item()
        assert gap <= 1e-4 * max(only_ref.max().item(), 1e-30) + 1e-7, f"selection differs beyond a near-tie ({gap})"
    ok_rows = ~flipped[:, :, None].expand_as(rel)
    tol = TOL[q.dtype]
    assert torch.isfinite(out).all()
    assert float(rel[ok_rows].max()) <= tol if ok_rows.any() else True, float(rel[ok_rows].max())
    max_flip = float(rel[~ok_rows].max()) if (~ok_rows).any() else 0.0
    assert max_flip <= 0.1, max_flip
    return int(flipped.numel()), int(flipped.sum()), max_flip


def run_case(batch, hq, hkv, seq, d, dtype, cfg, seed, tuning=None):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, lengths = _case(batch, hq, hkv, seq, d, dtype, gen)
    ws = _plan(q, k, cfg, tuning)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    ws.run(q, k, v, lengths, out=out)
    return compare(q, k, v, lengths, cfg, out, (ws.idx.cpu(), ws.counts[:, 0].cpu()), ws.deterministic)


CPU_CASES = [
    # batch, hq, hkv, S, d, dtype, config
    (2, 4, 4, 301, 64, torch.float32, SparQConfig(r=8, k=40, local_window=8)),
    (2, 8, 2, 517, 64, torch.float32, SparQConfig(r=8, k=40, local_window=8, reallocate=False)),
    (3, 6, 2, 263, 32, torch.float16, SparQConfig(r=4, k=16, k_fraction=0.1, local_fraction=0.25)),
    (2, 8, 1, 199, 64, torch.float16, SparQConfig(r=64, k=24, local_window=0)),
    (2, 3, 1, 97, 32, torch.float32, SparQConfig(r=5, k=200, local_window=4)),  # keep everything
    (2, 4, 4, 150, 128, torch.float16, SparQConfig(r=16, k=30, local_window=30)),  # local only
]

GPU_CASES = [
    (b, hkv * g, hkv, s, d, dt, cfg)
    for (b, g, hkv, s, d) in [(3, 1, 4, 4099, 128), (2, 3, 3, 2053, 64), (4, 4, 2, 8191, 128),
                             (2, 8, 1, 3001, 256), (1, 4, 8, 16411, 128), (5, 1, 2, 777, 64)]
    for dt in (torch.float16, torch.bfloat16)
    for cfg in (SparQConfig(r=max(1, d // 8), k=64, k_fraction=1 / 16, local_fraction=0.25),
                SparQConfig(r=d // 4, k=100, local_window=16, reallocate=False))
]


@pytest.mark.parametrize("case", CPU_CASES if not CUDA else CPU_CASES[:0] + GPU_CASES)
def test_kernels_match_reference(case, det):
    batch, hq, hkv, seq, d, dtype, cfg = case
    # two draws of each case: on the GPU both on each path; in the (slow) interpreter one on each
    seeds = (0, 1) if CUDA else ((0,) if det.deterministic else (1,))
    for seed in seeds:
        rows, flipped, max_flip = run_case(batch, hq, hkv, seq, d, dtype, cfg, seed, det)
        assert flipped <= max(1, rows // 4), f"{flipped}/{rows} rows flipped"


def _bracket_case(tuning, adversarial, cap=16, tied=False, samples=16, seed=5, check=True):
    tuning = tuning.with_(samples=samples, select_cap=cap)
    gen = torch.Generator().manual_seed(seed)
    batch, hq, hkv, seq, d = 2, 4, 2, 409, 32
    q, k, v, lengths = _case(batch, hq, hkv, seq, d, torch.float32, gen)
    cfg = SparQConfig(r=d, k=120, local_window=20)
    if tied:  # every key row one of 3 vectors: every score ties with ~1/3 of the others
        # Small integers in q and the rows: every dot product is exact in fp32 whatever the summation order,
        # so identical rows score identically. With Gaussian values the interpreter's tl.dot (numpy's BLAS)
        # can round the same row 1 ulp apart at different tile positions on some CPUs (seen on an AVX-512
        # host: the "ties" were then not ties, and the kept set rightly differed from the tie rule's).
        rows = torch.randint(-1, 2, (3, d), generator=gen).float()
        k = rows[torch.randint(0, 3, (batch, hkv, seq), generator=gen)].to(DEVICE, k.dtype)
        q = torch.randint(-1, 2, tuple(q.shape), generator=gen).to(DEVICE, q.dtype)
    if adversarial:  # the sampled positions (every stride-th candidate) score highest
        from sparq.kernels.select import sample_stride

        stride = sample_stride(seq, samples)
        for b in range(batch):
            n_cand = int(lengths[b]) - 20
            for pos in range(0, n_cand, stride):
                k[b, :, pos] = 3 * q[b].reshape(hkv, -1, d).sum(1) / q[b].norm()
    ws = _plan(q, k, cfg, tuning)
    out = torch.full_like(q, float("nan"))
    ws.run(q, k, v, lengths, out=out)
    if check:
        compare(q, k, v, lengths, cfg, out, (ws.idx.cpu(), ws.counts[:, 0].cpu()), ws.deterministic)
    if check and tied and ws.deterministic:
        _assert_reference_ties(q, k, lengths, cfg, ws)
    ws.last_out, ws.last_lengths = out, lengths.cpu()
    return ws


def _assert_reference_ties(q, k, lengths, cfg, ws):
    """With exact ties at the threshold the kept set is the reference's: ties go to the earlier
    position. Identical key rows get one score (that of their first valid occurrence): the
    kernels score them identically, and so does exact arithmetic."""
    batch, _, d = q.shape
    hkv, seq = k.shape[1], k.shape[2]
    valid = valid_mask(lengths, batch, seq, q.device)
    scores = reference.approx_scores(q.float(), k.float(), valid, cfg.r, 1.0 / math.sqrt(d)).sum(2).cpu()
    _, k_b, local_b = reference.budgets(cfg, valid)
    canon = scores.clone()
    kc = k.float().cpu()
    for b in range(batch):
        n = int(lengths[b])
        for h in range(hkv):
            _, inv = torch.unique(kc[b, h, :n], dim=0, return_inverse=True)
            first = torch.full((int(inv.max()) + 1,), n, dtype=torch.long).scatter_reduce(
                0, inv, torch.arange(n), "amin")
            canon[b, h, :n] = scores[b, h, :n][first[inv]]
    want = reference.select_topk(canon, valid.cpu(), k_b.cpu(), local_b.cpu())
    for b in range(batch):
        for h in range(hkv):
            kept = ws.idx[b * hkv + h, : int(k_b[b])].long().cpu()
            assert torch.equal(kept, want[b, h].nonzero().flatten()), (b, h)


@pytest.mark.parametrize("adversarial", [False, True])
def test_bracket_paths(adversarial, det):
    """Small sample and register capacity: the bracket path with candidates resolved from memory,
    and (adversarial: the sampled positions score highest) the exact fallback when the bracket misses."""
    _bracket_case(det, adversarial)


@pytest.mark.parametrize("tied, cap, samples, tile", [
    (False, 512, 16, 512), (False, 1024, 16, 512), (False, 1024, 256, 128),
    (True, 512, 16, 512), (True, 1024, 16, 512), (True, 4096, 16, 512)],
    ids=["whole", "half", "eighth", "tied-whole", "tied-half", "tied-eighth"])
def test_resolve_tile_fits_the_bracket(tied, cap, samples, tile, det):
    """The resolve holds the bracket in the smallest of CAP / 8, CAP / 2 or CAP keys that fits it (each
    search round compares every key of the tile): the reference's kept set in each of the three tiles,
    with distinct keys and with exact ties at the threshold (the earliest tied positions kept)."""
    ws = _bracket_case(det, False, cap=cap, samples=samples, tied=tied)
    if tile < cap:  # the same case in the whole tile (Tuning.resolve_fit_tile=False): the same kept set
        whole = _bracket_case(det.with_(resolve_fit_tile=False), False, cap=cap, samples=samples, tied=tied)
        assert torch.equal(whole.idx.cpu(), ws.idx.cpu()) if ws.deterministic else True
    n_c = [int(n) for n, kb, ln in zip(ws.counts[:, 1].tolist(), ws.k_b.repeat_interleave(2).tolist(),
                                       ws.last_lengths.repeat_interleave(2).tolist()) if kb < ln]
    assert n_c, "no KV head ran the selection"
    for n in n_c:  # the tile this case is meant to exercise is the smallest that holds the candidates
        assert min(t for t in (cap // 8, cap // 2, cap) if t >= n) == tile, (n_c, tile)


@pytest.mark.parametrize("copy, stored", [(True, True), (False, False)], ids=["copied-stored", "in-place-recomputed"])
@pytest.mark.parametrize("adversarial", [False, True], ids=["bracket", "fallback"])
def test_sample_and_candidate_key_sources(copy, stored, adversarial):
    """The selection's sample read from step 1's compact copy or in place from the logits, the resolve's
    candidate keys read as the emit stored them or recomputed: the reference's kept set either way,
    in the register path (cap 512) with a sample stride of 8 (409 positions, 64 samples)."""
    from sparq.kernels.dispatch import DEFAULT_TUNING

    tuning = DEFAULT_TUNING.with_(sample_copy=copy, candidate_keys=stored)
    ws = _bracket_case(tuning, adversarial, cap=512, samples=64)
    assert ws.sample_stride == 8 and ws.sample_copy == copy
    assert (ws.sample_buf.data_ptr() == ws.logits.data_ptr()) == (not copy)
    if copy:  # the copy holds every 8th logit (row 0 of the batch is full: 409 positions, 52 samples)
        lg, smp = ws.logits.cpu(), ws.sample_buf.cpu()
        assert torch.equal(smp[:2, :, :52], lg[:2, :, 0:409:8])


def test_register_caps_are_checked():
    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan

    cfg = SparQConfig(r=8, k=64, local_window=8)
    for bad in (dict(emit_maxnreg=8), dict(sketch_maxnreg=300), dict(emit_maxnreg=-1)):
        with pytest.raises(ValueError, match="maxnreg must be None"):
            DecodePlan(1, 4, 4, 32, 256, cfg, "cpu", torch.float32, DEFAULT_TUNING.with_(**bad))
    DecodePlan(1, 4, 4, 32, 256, cfg, "cpu", torch.float32, DEFAULT_TUNING.with_(emit_maxnreg=0, sketch_maxnreg=72))


def test_pdl_is_checked_and_off_where_unsupported():
    """Tuning.pdl (off by default): None turns programmatic dependent launch on only where it exists (CUDA
    sm_90+, not the interpreter); True where it does not is a ValueError naming the field, not a launch
    error."""
    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan

    cfg = SparQConfig(r=8, k=64, local_window=8)
    for pdl in (None, False):
        plan = DecodePlan(1, 4, 4, 32, 256, cfg, "cpu", torch.float32, DEFAULT_TUNING.with_(pdl=pdl))
        assert plan.pdl is False and plan.launch_opts == {}
    with pytest.raises(ValueError, match="Tuning.pdl=True"):
        DecodePlan(1, 4, 4, 32, 256, cfg, "cpu", torch.float32, DEFAULT_TUNING.with_(pdl=True))


def test_every_step_kernel_waits_first():
    """pdl.py's contract: in every kernel the step launches, wait_for_previous(PDL) is the first statement
    (a kernel that touched memory before it could read what its predecessor is still writing)."""
    import ast
    import inspect
    import textwrap

    from sparq.kernels import approx_scores, gather_attention, select, sketch_scores

    kernels = [select._budgets_kernel, select._sample_kernel, select._emit_kernel, select._resolve_kernel,
               select._compact_kernel, gather_attention._gather_attention_kernel, gather_attention._combine_kernel,
               sketch_scores._sketch_scores_kernel, approx_scores._query_prep_kernel,
               approx_scores._transposed_key_scores_kernel]
    for kern in kernels:
        fn = ast.parse(textwrap.dedent(inspect.getsource(kern.fn))).body[0]
        body = [n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        first = ast.unparse(body[0])
        assert first == "wait_for_previous(PDL)", (kern.fn.__name__, first)
        assert "PDL" in [a.arg for a in fn.args.args], kern.fn.__name__


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_pdl_step_is_bitwise_the_plain_step():
    """The step launched with PDL (Tuning.pdl=True, sm_90+) gives bitwise the output of plain launches,
    eagerly and replayed in a CUDA graph, over many steps (a kernel reading before its predecessor's
    writes land would show as a difference)."""
    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan
    from sparq.kernels.pdl import pdl_supported

    if not pdl_supported("cuda"):
        pytest.skip("no programmatic dependent launch on this GPU / Triton")
    torch.manual_seed(5)
    batch, hkv, hq, d, s = 3, 4, 16, 128, 9000
    cfg = SparQConfig(r=16, k=64, k_fraction=1 / 8, local_fraction=0.25)
    k = torch.randn(batch, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lengths = torch.tensor([9000, 4100, 7777], device="cuda", dtype=torch.int32)
    plans = {p: DecodePlan(batch, hq, hkv, d, s, cfg, "cuda", torch.bfloat16, DEFAULT_TUNING.with_(pdl=p))
             for p in (False, True)}
    assert plans[True].pdl and not plans[False].pdl
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    outs = {p: torch.empty_like(q) for p in plans}
    for p, plan in plans.items():  # compile outside the capture
        plan.run(q, k, v, lengths, out=outs[p])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plans[True].run(q, k, v, lengths, out=outs[True])
    for _ in range(20):
        q.copy_(torch.randn_like(q))
        plans[False].run(q, k, v, lengths, out=outs[False])
        want = outs[False].clone()
        plans[True].run(q, k, v, lengths, out=outs[True])
        assert torch.equal(outs[True], want)
        outs[True].zero_()
        graph.replay()
        assert torch.equal(outs[True], want)


def test_sample_copy_is_for_groups_by_default():
    """Tuning.sample_copy=None: the sketch scorer copies the sample for g > 1 only (where reading it in
    place costs g sectors per sampled position), never with stride 1 (the sample is then the logits);
    the paper's scorer never does (its wide tiles made the copy cost more than it saved)."""
    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan
    from sparq.kernels.sketch_scores import SketchConfig
    from sparq.methods.sketch import SparQSketch

    sketch = SketchConfig.from_method(SparQSketch(0.125, bits=2, block=128), 32)
    paper = SparQConfig(r=8, k=64, local_window=8)
    for cfg, hq, hkv, cap, want in ((sketch, 8, 2, 65536, True), (sketch, 4, 4, 65536, False),
                                    (sketch, 8, 2, 1024, False), (paper, 8, 2, 65536, False)):
        plan = DecodePlan(1, hq, hkv, 32, cap, cfg, "cpu", torch.float32, DEFAULT_TUNING)
        assert plan.sample_copy == want and (plan.sample_buf is plan.logits) == (not want), (hq, hkv, cap)
        assert plan.sample_shift == (plan.sample_stride.bit_length() - 1 if want else 0), (hq, hkv, cap)
        assert (plan.sample_stride > 1) == (cap == 65536)


@pytest.mark.parametrize("cap, samples", [(512, 128), (512, 16), (16, 16)], ids=["registers", "wide", "memory"])
@pytest.mark.parametrize("adversarial", [False, True], ids=["bracket", "fallback"])
def test_ties_go_to_earlier_positions(cap, samples, adversarial):
    """Deterministic path, keys from 3 repeated row vectors (exact ties at the threshold): the kept
    set equals the reference's (earliest tied positions) in the register, in-memory and fallback
    resolve paths, and the kept list is ascending (checked in compare)."""
    from sparq.kernels.dispatch import DEFAULT_TUNING

    for seed in (5, 6) if CUDA else (5 + adversarial,):  # the interpreter: one draw per case
        _bracket_case(DEFAULT_TUNING.with_(deterministic=True), adversarial, cap=cap, tied=True, samples=samples,
                      seed=seed)


class _PermutedCandidates:
    """Stands in for dispatch._resolve_kernel: permutes each KV head's bracket-candidate list (the
    order in which the emit tiles' atomics happened to land; the keys stored beside the positions
    move with them) before the real launch."""

    def __init__(self, kernel, seed):
        self.kernel, self.gen = kernel, torch.Generator().manual_seed(seed)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            counts, cand, cand_keys = args[6], args[8], args[9]
            for row, n in enumerate(counts[:, 1].tolist()):
                if n > 1:
                    perm = torch.randperm(n, generator=self.gen).to(cand.device)
                    cand[row, :n] = cand[row, :n][perm]
                    cand_keys[row, :n] = cand_keys[row, :n][perm]
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("cap, tied", [(512, False), (512, True), (16, True)], ids=["registers", "reg-tied", "memory"])
def test_deterministic_order_and_reruns(monkeypatch, det, cap, tied):
    """Two runs give bitwise-identical kept lists and outputs, and (deterministic path) so does a
    run whose bracket-candidate list arrives in another order, as tile scheduling may give on a
    GPU; the old atomic-order path is shown to depend on that order (a check of this test)."""
    from sparq.kernels import dispatch

    first = _bracket_case(det, False, cap=cap, tied=tied, samples=128)
    idx0, out0 = first.idx.clone(), first.last_out.clone()
    again = _bracket_case(det, False, cap=cap, tied=tied, samples=128)
    assert torch.equal(again.idx, idx0) and torch.equal(again.last_out, out0)
    assert int(again.counts[:, 1].max()) > 1  # there is a candidate list to permute
    for seed in (0, 1) if CUDA else (0,):  # the interpreter: one permuted order
        monkeypatch.setattr(dispatch, "_resolve_kernel", _PermutedCandidates(dispatch._resolve_kernel, seed))
        # the old path may now keep other tied positions than the reference: no comparison there
        ws = _bracket_case(det, False, cap=cap, tied=tied, samples=128, check=det.deterministic)
        monkeypatch.setattr(dispatch, "_resolve_kernel", dispatch._resolve_kernel.kernel)
        same = torch.equal(ws.idx, idx0) and torch.equal(ws.last_out, out0)
        assert same if det.deterministic else not torch.equal(ws.idx, idx0)


@triton.jit
def _kth_probe(u_ptr, n, j_ptr, lo_ptr, hi_ptr, tol, out_ptr, N: tl.constexpr, P: tl.constexpr):
    q = tl.program_id(0)
    i = tl.arange(0, N)
    ok = i < n
    u = tl.load(u_ptr + i, mask=ok, other=0)
    lo, hi = _kth_largest_mp(u, ok, tl.load(j_ptr + q), tl.load(lo_ptr + q), tl.load(hi_ptr + q), tol, P)
    tl.store(out_ptr + 2 * q, lo)
    tl.store(out_ptr + 2 * q + 1, hi)


@pytest.mark.parametrize("pivots", [1, 2, 4, 8, 16])
def test_kth_largest_multi_pivot(pivots):
    """The search alone against a sort: int64 order keys over the whole [0, 2^32) range (both ends
    included), heavy ties, all-equal keys, a start from the full range and from tight brackets,
    exact (tol 0) and with a tolerance: lo <= v <= hi, hi - lo <= tol."""
    gen = torch.Generator().manual_seed(pivots)
    top = (1 << 32) - 1
    sets = [
        torch.randint(0, 1 << 32, (100,), generator=gen, dtype=torch.int64),
        torch.cat([torch.tensor([0, 0, top, top, 1, top - 1]),
                   torch.randint(0, 1 << 32, (57,), generator=gen, dtype=torch.int64)]),
        torch.randint(0, 4, (128,), generator=gen, dtype=torch.int64) * 1000 + 3_000_000_000,  # ties
        torch.full((77,), 123456789, dtype=torch.int64),  # all equal
        torch.full((5,), top, dtype=torch.int64),
        torch.zeros(9, dtype=torch.int64),
    ]
    for u in sets:
        n = u.numel()
        srt = u.sort(descending=True).values
        js = torch.tensor([0, n // 2, n - 1] + torch.randint(0, n, (2,), generator=gen).tolist())
        v = srt[js]
        for tol in (0, 1000):
            for bracket in ("full", "tight", "exact"):
                if bracket == "full":
                    lo0, hi0 = torch.zeros_like(v), torch.full_like(v, top)
                elif bracket == "tight":  # a sample-like bracket around v: [U_lo, U_hi]
                    lo0 = (v - torch.randint(0, 1 << 22, v.shape, generator=gen)).clamp_min(0)
                    hi0 = (v + torch.randint(0, 1 << 22, v.shape, generator=gen)).clamp_max(top)
                else:
                    lo0, hi0 = v.clone(), v.clone()
                out = torch.empty(js.numel(), 2, dtype=torch.int64)
                _kth_probe[(js.numel(),)](u.to(DEVICE), n, js.to(torch.int32).to(DEVICE), lo0.to(DEVICE),
                                          hi0.to(DEVICE), tol, out_buf := out.to(DEVICE),
                                          N=triton.next_power_of_2(n), P=pivots)
                lo, hi = out_buf.cpu().unbind(1)
                assert bool((lo <= v).all() and (v <= hi).all()), (pivots, tol, bracket, lo, v, hi)
                assert bool((hi - lo <= tol).all()), (pivots, tol, bracket, hi - lo)
                if tol == 0:
                    assert torch.equal(lo, v)


@pytest.mark.parametrize("pivots", [1, 8])
def test_search_pivots_bisection_and_multi_pivot(pivots, det):
    """The whole selection with the threshold searches forced to bisection (1) or 8 pivots per
    round (no register budget): random shapes (g = 1 and g > 1), the in-memory and the fallback
    bracket paths, ties in registers, ties in memory and ties in the fallback, all-equal keys."""
    tuning = det.with_(search_pivots=pivots, search_budget=None)
    for case in (CPU_CASES[0], CPU_CASES[1]):
        batch, hq, hkv, seq, d, dtype, cfg = case
        rows, flipped, _ = run_case(batch, hq, hkv, seq, d, dtype, cfg, 7, tuning)
        assert flipped <= max(1, rows // 4), f"{flipped}/{rows} rows flipped"
    for adversarial in (False, True):  # adversarial: the bracket misses, exact fallback
        # (tied, deterministic path: the kept set is also checked against the reference's ties)
        _bracket_case(tuning, adversarial, cap=512)  # [U_lo, 2^32]: in registers
        _bracket_case(tuning, adversarial, cap=16, tied=True)  # in memory
    for tied in (False, True):  # 128 samples: [U_lo, U_hi] both inside, in registers
        ws = _bracket_case(tuning, False, cap=512, tied=tied, samples=128)
        assert int(ws.state[0, 0]) < 1 << 32 and 0 < int(ws.counts[0, 1]) <= 512
    test_many_ties_keep_exactly_k(tuning)


def test_search_pivots_budget():
    from sparq.kernels.select import search_pivots

    assert search_pivots(4096, 16, 8, 64) == 8
    assert search_pivots(8192, 16, 8, 64) == 4
    assert search_pivots(16384, 32, 8, 64) == 4
    assert search_pivots(16384, 32, 8, None) == 8
    assert search_pivots(2048, 16, 12, 64) == 8  # a power of 2
    assert search_pivots(4096, 16, 1, 64) == search_pivots(4096, 16, None, 64) == 1
    assert search_pivots(1 << 20, 1, 8, 64) == 1


def test_selection_sizes_fit_the_bracket():
    """Host-side sizing: the predicted bracket fits the resolve kernel's registers for long contexts
    and large budgets (the in-memory path is for adversarial orders only); short contexts keep the
    small, fast sample."""
    from sparq.kernels import select

    for seq, kf in ((4096, 1 / 16), (65536, 1 / 16), (131072, 1 / 16), (131072, 1 / 8), (131072, 1 / 4),
                    (262144, 1 / 4), (1 << 20, 1 / 2)):
        cfg = SparQConfig(r=16, k=64, k_fraction=kf, local_fraction=0.25)
        ns, stride, cap, tol = select.selection_sizes(seq, cfg)
        assert ns >= -(-seq // stride) and ns & (ns - 1) == 0 and stride & (stride - 1) == 0
        worst = max(sum(select.predicted_bracket(n, cfg, stride)) for n in range(1, seq + 1, max(1, seq // 97)))
        assert worst <= cap or cap == 16384, (seq, kf, ns, cap, worst)
    assert select.selection_sizes(65536, SparQConfig(r=16, k=64, k_fraction=1 / 16, local_fraction=0.25))[:3] == (
        2048, 32, 4096)
    # a capacity just past a power of two: the stride doubles, the sample stays within the tile
    assert select.sample_sizes(32816, 2048, 4096, 65535)[:2] == (2048, 32)
    assert select.sample_sizes(409, 16, 16, 65535)[:2] == (16, 32)
    assert select.sample_sizes(100, 2048, 4096, 65535)[:2] == (128, 1)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("k_div", [8, 4])
def test_long_context_large_budget_stays_in_registers(k_div):
    """GQA 32/8 d=128 bf16 at 131072 positions with k = S/8 and S/4: matches the reference, and the
    bracket held every candidate in the resolve kernel's registers (no in-memory fallback)."""
    batch, hq, hkv, seq, d = 2, 32, 8, 131072, 128
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(batch, hq, d, device="cuda", generator=gen).bfloat16()
    k = torch.randn(batch, hkv, seq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(batch, hkv, seq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    lengths = torch.tensor([seq, 97001], device="cuda")
    cfg = SparQConfig(r=d // 8, k=64, k_fraction=1 / k_div, local_fraction=0.25)
    ws = _plan(q, k, cfg)
    out = torch.full_like(q, float("nan"))
    ws.run(q, k, v, lengths, out=out)
    n_bracket = ws.counts[:, 1].cpu()
    assert int(n_bracket.max()) <= ws.cap, (n_bracket.tolist(), ws.cap, ws.samples)
    compare(q, k, v, lengths, cfg, out, (ws.idx.cpu(), ws.counts[:, 0].cpu()))


def test_many_ties_keep_exactly_k(det):
    """Equal keys everywhere: every score ties, the kernels must still keep exactly k_b positions
    (deterministic path: the reference's, the first k_b - local_b and the local window)."""
    cfg = SparQConfig(r=4, k=20, local_window=4)
    # integer q: q . 1 is exact in any summation order, so every score ties exactly (see _bracket_case)
    q = torch.randint(-3, 4, (2, 2, 32), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    k = torch.ones(2, 2, 130, 32, device=DEVICE)
    v = torch.randn(2, 2, 130, 32, device=DEVICE)
    lengths = torch.tensor([130, 77], device=DEVICE)
    ws = _plan(q, k, cfg, det)
    out = ws.run(q, k, v, lengths)
    counts = ws.counts[:, 0].cpu()
    assert counts.tolist() == [20, 20, 20, 20]
    for row, b in ((0, 0), (1, 0), (2, 1), (3, 1)):
        kept = ws.idx[row, :20].long().cpu()
        assert kept.unique().numel() == 20 and int(kept.max()) < int(lengths[b])
        if ws.deterministic:
            n = int(lengths[b])
            assert kept.tolist() == list(range(16)) + list(range(n - 4, n))
    # all logits are equal, so any kept set gives the mean of the kept V rows; alpha = 20/len
    assert torch.isfinite(out).all()


def test_kernel_cache_prefill_append_matches_reference():
    from sparq.caches.static import KernelCacheLayer
    from sparq.kernels.dispatch import sparq_decode

    dtype = torch.float16
    gen = torch.Generator().manual_seed(3)
    batch, hkv, hq, d, cap = 2, 2, 4, 64, 161
    cache = KernelCacheLayer(batch, hkv, d, cap, dtype, DEVICE)
    k0 = torch.randn(batch, hkv, 100, d, generator=gen).to(DEVICE, dtype)
    v0 = torch.randn(batch, hkv, 100, d, generator=gen).to(DEVICE, dtype)
    cache.prefill(k0, v0, torch.tensor([100, 57], device=DEVICE))
    for _ in range(5):
        cache.append(torch.randn(batch, hkv, d, generator=gen).to(DEVICE, dtype),
                     torch.randn(batch, hkv, 1, d, generator=gen).to(DEVICE, dtype))
    assert cache.lengths.tolist() == [105, 62]
    assert torch.equal(cache.key_t, cache.key.transpose(-1, -2))
    valid = valid_mask(cache.lengths, batch, cap, cache.key.device)
    vsum = (cache.value.float() * valid[:, None, :, None]).sum(2)
    assert torch.allclose(cache.value_sum, vsum, atol=1e-3)
    cfg = SparQConfig(r=8, k=24, local_window=6)
    q = torch.randn(batch, hq, d, generator=gen).to(DEVICE, dtype)
    out = sparq_decode(q, cache.key, cache.value, cfg, cache.lengths, key_t=cache.key_t, value_sum=cache.value_sum)
    ref = reference.sparq_reference(q.float(), cache.key.float(), cache.value.float(), cfg, valid, 1 / math.sqrt(d))
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOL[dtype]


def test_step_writes_its_budgets_and_counters(det):
    """The step looks k_b, local_b up and zeroes its list counters itself (in the sample kernel, no
    launch of its own): a plan whose budget and counter buffers hold garbage from elsewhere gives the
    same output and kept lists as a fresh one."""
    gen = torch.Generator().manual_seed(21)
    q, k, v, lengths = _case(3, 8, 2, 300, 32, torch.float32, gen)
    cfg = SparQConfig(r=8, k=40, local_window=8)
    plan = _plan(q, k, cfg, det)
    fresh = plan.run(q, k, v, lengths).clone()
    idx = plan.idx.clone()
    plan.k_b.fill_(7)
    plan.local_b.fill_(299)
    plan.counts.fill_(12345)
    again = plan.run(q, k, v, lengths)
    assert torch.equal(again, fresh) and torch.equal(plan.idx, idx)
    assert plan.k_b.tolist() == [cfg.k_for(int(n)) for n in lengths]


def test_budget_table_kernel_matches_config():
    """The plan's budget table equals SparQConfig.k_for / local_for for every length (round half to
    even included), and `_budgets_kernel` looks it up on the device: every length on the GPU; in the
    interpreter (a program per length, ~4 ms each) all lengths below 130, every 23rd above and the
    last two."""
    from sparq.kernels.select import _budgets_kernel

    n = 3000
    every = range(1, n + 1)
    looked_up = every if CUDA else sorted({*range(1, 130), *range(130, n + 1, 23), n - 1, n})
    m = len(looked_up)
    lengths = torch.tensor(looked_up, dtype=torch.int32, device=DEVICE)
    for cfg in (SparQConfig(r=4, k=64, k_fraction=1 / 16, local_fraction=0.25),
                SparQConfig(r=4, k=3, local_window=1, k_fraction=0.3, local_fraction=0.5),
                SparQConfig(r=4, k=5, local_window=0, k_fraction=0.1, local_fraction=0.3),
                SparQConfig(r=4, k=10, local_window=10)):
        key_shape = torch.zeros(1, 1, 1, 32, device=DEVICE).expand(m, 1, n, 32)  # a shape, no memory
        plan = _plan(torch.zeros(m, 1, 32, device=DEVICE), key_shape, cfg)
        table = plan.budget_table.cpu().view(-1, 2)
        assert table.shape[0] == n + 1
        assert table[1:, 0].tolist() == [cfg.k_for(i) for i in every]
        assert table[1:, 1].tolist() == [cfg.local_for(i) for i in every]
        plan.counts.fill_(1)
        _budgets_kernel[(m,)](lengths, plan.budget_table, plan.k_b, plan.local_b, plan.counts, 1, H2_PAD=2)
        assert plan.k_b.tolist() == [cfg.k_for(i) for i in looked_up]
        assert plan.local_b.tolist() == [cfg.local_for(i) for i in looked_up]
        assert int(plan.counts.abs().sum()) == 0


def test_budgets_on_device_match_config():
    from sparq.kernels.select import budgets

    lengths = torch.arange(1, 3000, 7)
    for cfg in (SparQConfig(r=4, k=64, k_fraction=1 / 16, local_fraction=0.25),
                SparQConfig(r=4, k=3, local_window=1, k_fraction=0.3, local_fraction=0.5),
                SparQConfig(r=4, k=10, local_window=10)):
        k, local = budgets(cfg, lengths)
        assert k.tolist() == [cfg.k_for(int(n)) for n in lengths]
        assert local.tolist() == [cfg.local_for(int(n)) for n in lengths]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_capture_of_decode_step():
    from sparq.caches.static import KernelCacheLayer

    dtype = torch.bfloat16
    batch, hkv, hq, d, cap = 2, 4, 16, 128, 5003
    cache = KernelCacheLayer(batch, hkv, d, cap, dtype, "cuda")
    cache.prefill(torch.randn(batch, hkv, 4000, d, device="cuda", dtype=dtype),
                  torch.randn(batch, hkv, 4000, d, device="cuda", dtype=dtype),
                  torch.tensor([4000, 3111], device="cuda"))
    cfg = SparQConfig(r=16, k=64, k_fraction=1 / 16, local_fraction=0.25)
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
    new_k = torch.randn(batch, hkv, d, device="cuda", dtype=dtype)
    new_v = torch.randn(batch, hkv, d, device="cuda", dtype=dtype)
    from sparq.api import sparq_attention
    from sparq.kernels.dispatch import PlanCache

    plans = PlanCache(growth=False)

    def attend():
        return sparq_attention(q, cache.key, cache.value, cfg, cache.lengths, key_t=cache.key_t,
                               value_sum=cache.value_sum, plans=plans, validate=False)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up compiles the kernels outside the capture
            attend()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.append(new_k, new_v)
        out = attend()
    for step in range(3):
        q.copy_(torch.randn_like(q))
        new_k.copy_(torch.randn_like(new_k))
        new_v.copy_(torch.randn_like(new_v))
        graph.replay()
        torch.cuda.synchronize()
        valid = valid_mask(cache.lengths, batch, cap, q.device)
        ref = reference.sparq_reference(q.float(), cache.key.float(), cache.value.float(), cfg, valid, 1 / math.sqrt(d))
        assert ((out.float() - ref).norm() / ref.norm()).item() < 3e-2
    assert cache.lengths.tolist() == [4003, 3114]


# Every configuration the API accepts gives the reference's answer: the edges that once crashed
# inside Triton on the GPU (k = 1 and local_window = 1 specialised into constants, r > head_dim,
# r > 128 overflowing shared memory, tiny S with k = S, one KV head, head_dim 32), at small sizes.
EDGE_CASES = [
    # batch, hq, hkv, S, d, config
    (2, 2, 1, 37, 32, SparQConfig(r=1, k=1)),
    (2, 4, 2, 41, 64, SparQConfig(r=3, k=2, local_window=1)),
    (1, 3, 3, 7, 32, SparQConfig(r=40, k=7, local_window=1)),  # r > d, k = S
    (3, 8, 1, 1, 64, SparQConfig(r=5, k=1)),  # S = 1
    (2, 2, 2, 9, 32, SparQConfig(r=32, k=17, local_window=16)),  # k > S
    (2, 5, 1, 133, 256, SparQConfig(r=133, k=9, local_window=1, k_fraction=0.0625)),  # r > 128
    (2, 2, 2, 70, 16, SparQConfig(r=16, k=1, local_window=1, reallocate=False)),  # only the local window
    (1, 16, 2, 300, 32, SparQConfig(r=7, k=16, k_fraction=0.3, local_fraction=1.0)),  # g = 8
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=[f"edge{i}" for i in range(len(EDGE_CASES))])
def test_edge_configurations_match_reference(case):
    from sparq.api import sparq_attention

    batch, hq, hkv, seq, d, cfg = case
    dtype = torch.float16 if CUDA else torch.float32
    gen = torch.Generator().manual_seed(len(str(case)))
    q, k, v, lengths = _case(batch, hq, hkv, seq, d, dtype, gen)
    ws = _plan(q, k, cfg)
    out = ws.run(q, k, v, lengths)
    compare(q, k, v, lengths, cfg, out, (ws.idx.cpu(), ws.counts[:, 0].cpu()), ws.deterministic)
    # and through the public API (which may pick the reference on the CPU: then it is exact)
    api = sparq_attention(q, k, v, cfg, lengths)
    ref = reference.sparq_reference(q.float(), k.float(), v.float(), cfg, valid_mask(lengths, batch, seq, q.device),
                                    1 / math.sqrt(d))
    assert torch.allclose(api.float(), ref, atol=5e-3, rtol=5e-3)


def test_score_block_fits_shared_memory():
    """The step-1 tile of Kᵀ (r_pad x block positions) stays within 64 KB for every r <= 256."""
    from sparq.kernels.dispatch import DEFAULT_TUNING, _score_block

    for r in (1, 16, 64, 128, 129, 200, 256):
        for elt in (2, 4):
            block = _score_block(r, elt, False, DEFAULT_TUNING)
            assert max(16, triton.next_power_of_2(r)) * block * elt <= 64 * 1024, (r, elt, block)
            assert block >= 64 and block & (block - 1) == 0


@pytest.mark.parametrize("g", [1, 4])
def test_left_padded_rows_on_the_kernels(g, det):
    """Per-row start offsets (a left-padded cache, as transformers' generate makes): row b's valid
    positions are [starts[b], starts[b] + lengths[b]); equals the reference over that mask, and the
    same rows moved to the left of the buffer."""
    gen = torch.Generator().manual_seed(g)
    batch, hkv, seq, d = 3, 2, 211, 64
    dtype = torch.float16 if CUDA else torch.float32
    q, k, v, _ = _case(batch, hkv * g, hkv, seq, d, dtype, gen)
    starts = torch.tensor([0, 17, 150], device=DEVICE)
    lengths = seq - starts
    lengths[0] -= 5  # a row with padding on both sides
    cfg = SparQConfig(r=9, k=24, local_window=5)
    ws = _plan(q, k, cfg, det)
    out = ws.run(q, k, v, lengths.to(torch.int32), starts=starts)
    valid = valid_mask(lengths, batch, seq, q.device, starts)
    ref = reference.sparq_reference(q.float(), k.float(), v.float(), cfg, valid, 1 / math.sqrt(d))
    assert torch.allclose(out.float(), ref, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)
    # the same rows left-aligned through the plain-lengths path give the same output
    k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
    for b in range(batch):
        n, s0 = int(lengths[b]), int(starts[b])
        k2[b, :, :n], v2[b, :, :n] = k[b, :, s0:s0 + n], v[b, :, s0:s0 + n]
    aligned = ws.run(q, k2, v2, lengths.to(torch.int32))
    assert torch.allclose(out.float(), aligned.float(), atol=1e-5, rtol=1e-5)


def test_plan_cache_grows_geometrically_and_stays_bounded():
    """A growing cache (one position per step) makes O(log S) plans and holds one; a static cache
    plans once; the plan's workspace does not depend on the step."""
    from sparq.kernels.dispatch import PlanCache

    cfg = SparQConfig(r=4, k=8, local_window=2)
    dtype = torch.float16 if CUDA else torch.float32
    q = torch.randn(1, 2, 32, device=DEVICE, dtype=dtype)
    plans = PlanCache(min_capacity=16)
    seen = set()
    for seq in range(5, 140, 3):
        k = torch.randn(1, 1, seq, 32, device=DEVICE, dtype=dtype)
        p = plans.get(q, k, cfg)
        assert p.capacity >= seq and p.capacity < max(32, 2 * seq)
        seen.add(p.capacity)
        assert len(plans) == 1
    assert plans.created == len(seen) <= 5
    static = PlanCache(growth=False)
    k = torch.randn(1, 1, 77, 32, device=DEVICE, dtype=dtype)
    assert static.get(q, k, cfg) is static.get(q, k, cfg) and static.get(q, k, cfg).capacity == 77


def test_compaction_split_into_single_tiles():
    """`Tuning.compact_tiles`: the ordered compaction with one emit tile per program (more programs,
    each starting from the scan of the tile counts before it) gives the same kept lists."""
    from sparq.kernels.dispatch import DEFAULT_TUNING

    # one emit split per KV head (the whole row), compaction in programs of 2 tiles; 64-position emit
    # tiles (the interpreter's size) so that these short rows span several programs on the GPU too
    tuning = DEFAULT_TUNING.with_(deterministic=True, emit_blocks_per_sm=1, compact_tiles=2, emit_block=64)
    for case in (CPU_CASES[0], CPU_CASES[1]):
        batch, hq, hkv, seq, d, dtype, cfg = case
        dtype = torch.float16 if CUDA else dtype  # the kernels take fp16/bf16 on the GPU
        plan = _plan(torch.empty(batch, hq, d, dtype=dtype), torch.empty(batch, hkv, seq, d, dtype=dtype), cfg, tuning)
        assert plan.n_split_e == 1 and plan.n_split_c > 1
        rows, flipped, _ = run_case(batch, hq, hkv, seq, d, dtype, cfg, 11, tuning)
        assert flipped <= max(1, rows // 4), f"{flipped}/{rows} rows flipped"
    _bracket_case(tuning, False, cap=16, tied=True)  # ties in memory: the reference's kept set
