"""Baseline and improved decode methods: dense when the budget covers everything, padding never
read, accounting by the formulas, H2O eviction permanent, Quest page bounds exact."""

from __future__ import annotations

import math

import pytest
import torch

from sparq import reference
from sparq.methods import (
    H2O, METHODS, DecodeInputs, SparQSketch, Streaming, TopK, build_method, parse_spec,
)
from sparq.methods.h2o import PREFILL_KEY, prefill_scores
from sparq.methods.quest import page_bounds
from sparq.methods.sketch import key_sketch

D = 16


def _inputs(b=2, hq=4, hkv=2, s=40, d=D, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    valid = torch.ones(b, s, dtype=torch.bool)
    if lengths is not None:  # left padding
        for i, n in enumerate(lengths):
            valid[i, : s - n] = False
    return q, k, v, valid


def _x(q, k, v, valid):
    vs = (v * valid[:, None, :, None]).sum(2)
    return DecodeInputs(query=q, key=k, value=v, valid=valid, scale=D**-0.5, value_sum=vs)


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_equals_dense(name):
    q, k, v, valid = _inputs(lengths=[40, 27])
    m = build_method(name, 1.0, D)
    out = m.attend(_x(q, k, v, valid))
    ref = reference.dense_reference(q, k, v, valid, D**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert m.data_fraction(40, D) == 1.0


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125])
def test_padding_never_read(name, budget):
    """A left-padded sequence gives the same output as the same sequence unpadded, and garbage
    (NaN) in the padding changes nothing."""
    s, n = 300, 211
    q, k, v, _ = _inputs(b=1, s=s, seed=3)
    valid_full = torch.ones(1, n, dtype=torch.bool)
    m = build_method(name, budget, D)
    unpadded = m.attend(_x(q, k[:, :, -n:], v[:, :, -n:], valid_full))
    kp, vp = k.clone(), v.clone()
    kp[:, :, : s - n] = float("nan")
    vp[:, :, : s - n] = float("nan")
    valid = torch.zeros(1, s, dtype=torch.bool)
    valid[:, s - n:] = True
    x = DecodeInputs(query=q, key=kp, value=vp, valid=valid, scale=D**-0.5,
                     value_sum=(v[:, :, s - n:]).sum(2))
    padded = m.attend(x)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)


def test_sparse_methods_differ_from_dense_at_small_budget():
    q, k, v, valid = _inputs(s=400, seed=5)
    ref = reference.dense_reference(q, k, v, valid, D**-0.5)
    for name in METHODS[1:]:
        out = build_method(name, 1 / 8, D).attend(_x(q, k, v, valid))
        assert not torch.allclose(out, ref, atol=1e-6), name


@pytest.mark.parametrize("s", [200, 1000, 3001])
def test_accounting_formulas(s):
    d, f = 64, 1 / 8
    st = build_method("streaming", f, d)
    k = math.floor(f * s)
    assert st.data_fraction(s, d) == pytest.approx(k / s)
    assert build_method("topk", f, d).data_fraction(s, d) == pytest.approx(k / s)
    h = build_method("h2o", f, d)
    kh = math.floor(f * 2 * s * d / (2 * d + 1))
    assert h.data_fraction(s, d) == pytest.approx((2 * kh * d + kh) / (2 * s * d))
    if s < 1000:
        return  # below that the shared min_k floor decides k; checked separately
    qu = build_method("quest", f, d)
    assert qu.page == 16
    pages = math.ceil(s / 16)
    kept = math.floor((f * 2 * s * d - 2 * d * pages) / (2 * d)) // 16
    assert qu.data_fraction(s, d) == pytest.approx((2 * d * pages + 2 * kept * 16 * d) / (2 * s * d))
    sk = build_method("sparq-sketch", f, d)
    assert sk.bits == 2
    over = s * d * 2 / 16 + 2 * d * (s // 128)
    ks = math.floor((f * 2 * s * d - over) / (2 * d))
    assert sk.data_fraction(s, d) == pytest.approx((over + 2 * ks * d) / (2 * s * d))
    sp = build_method("sparq", f, d)  # SparQConfig.from_compression(8, d): min_k 64
    r, kk = d // 8, max(64, math.ceil(s / 16))
    assert sp.data_fraction(s, d) == pytest.approx((s * r + 2 * kk * d) / (2 * s * d))
    for m in (st, h, qu, sk):  # every method stays within its target (the floor aside)
        assert m.data_fraction(s, d) <= f + 1e-9


def test_streaming_keeps_sinks_and_window():
    m = Streaming(0.25, sinks=4, min_k=1)
    valid = torch.zeros(1, 50, dtype=torch.bool)
    valid[:, 10:] = True  # 40 real tokens -> k = 10: 4 sinks + 6 recent
    keep = m.keep_mask(valid, D)[0]
    assert keep.nonzero().flatten().tolist() == [10, 11, 12, 13, 44, 45, 46, 47, 48, 49]


def test_topk_keeps_true_top_positions():
    q, k, v, valid = _inputs(b=1, hq=2, hkv=1, s=64, seed=7)
    k[0, 0, 5] = q[0].sum(0) * 3  # a position both heads love
    m = TopK(1 / 16, min_k=1)  # k = 4
    probs = torch.softmax((q[0] @ k[0, 0].T) * D**-0.5, -1).sum(0)
    top = set(probs.topk(4).indices.flatten().tolist())
    assert 5 in top
    keep = torch.zeros(1, 1, 64, dtype=torch.bool)
    keep[0, 0, list(top)] = True
    torch.testing.assert_close(m.attend(_x(q, k, v, valid)),
                               reference.gather_attention(q, k, v, keep, D**-0.5).reshape(1, 2, D))


def test_h2o_eviction_is_permanent():
    torch.manual_seed(0)
    b, hq, hkv, d, s0 = 1, 2, 1, D, 64
    m = H2O(1 / 4, recent_fraction=0.5, min_k=1)
    k = torch.randn(b, hkv, s0, d)
    v = torch.randn(b, hkv, s0, d)
    state: dict = {}
    m.observe_prefill(torch.randn(b, hq, s0, d), k, v, torch.ones(b, s0, dtype=torch.bool), D**-0.5, state)
    assert state[PREFILL_KEY].shape == (b, hkv, s0)
    evicted: set[int] = set()
    for step in range(40):
        k = torch.cat([k, torch.randn(b, hkv, 1, d)], 2)
        v = torch.cat([v, torch.randn(b, hkv, 1, d)], 2)
        s = k.shape[2]
        q = torch.randn(b, hq, d) * 3
        m.attend(DecodeInputs(query=q, key=k, value=v, valid=torch.ones(b, s, dtype=torch.bool),
                              scale=D**-0.5, state=state))
        kept = state["h2o"]["kept"][0, 0]
        assert int(kept.sum()) <= m.k_for(s, d)
        now_evicted = set((~kept).nonzero().flatten().tolist())
        assert evicted <= now_evicted, "an evicted position came back"
        evicted = now_evicted
    assert len(evicted) > 0


def test_h2o_prefill_scores_match_loop():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 6, D)
    k = torch.randn(1, 1, 6, D)
    valid = torch.tensor([[False, True, True, True, True, True]])
    got = prefill_scores(q, k, valid, D**-0.5, chunk=4)
    want = torch.zeros(6)
    for h in range(2):
        for i in range(1, 6):
            logits = (k[0, 0, 1: i + 1] @ q[0, h, i]) * D**-0.5
            want[1: i + 1] += logits.softmax(-1)
    torch.testing.assert_close(got[0, 0], want)


def test_quest_page_bounds_are_exact():
    q, k, v, valid = _inputs(b=2, hkv=2, s=37, seed=9, lengths=[37, 30])
    page, lo, hi = page_bounds(k, valid, 8)
    for b in range(2):
        pos = valid[b].nonzero().flatten()
        for p in range(math.ceil(len(pos) / 8)):
            idx = pos[p * 8: (p + 1) * 8]
            assert (page[b, idx] == p).all()
            torch.testing.assert_close(lo[b, :, p], k[b][:, idx].amin(1))
            torch.testing.assert_close(hi[b, :, p], k[b][:, idx].amax(1))
    assert (page[1, :7] == -1).all()


def test_quest_bound_is_an_upper_bound_and_keeps_best_page():
    q, k, v, valid = _inputs(b=1, hq=1, hkv=1, s=64, seed=11)
    page, lo, hi = page_bounds(k, valid, 8)
    bound = torch.maximum(q[0, 0] * lo[0, 0], q[0, 0] * hi[0, 0]).sum(-1)  # [P]
    logits = k[0, 0] @ q[0, 0]
    for p in range(8):
        assert logits[p * 8:(p + 1) * 8].max() <= bound[p] + 1e-5


def test_sketch_quantisation_is_causal_and_bounded():
    torch.manual_seed(2)
    k = torch.randn(1, 1, 300, D)
    valid = torch.ones(1, 300, dtype=torch.bool)
    sk = key_sketch(k, valid, bits=2, block=128)
    assert not torch.allclose(sk, k)
    # the unfinished block is coded with the previous block's range (clamped)
    lo, hi = k[0, 0, 128:256].amin(0), k[0, 0, 128:256].amax(0)
    tail = sk[0, 0, 256:]
    assert ((tail >= lo - 1e-6) & (tail <= hi + 1e-6)).all()
    for c in range(D):
        assert set(tail[:, c].tolist()) <= set(sk[0, 0, 128:256, c].tolist()) | {float(lo[c]), float(hi[c])}
    for blk in range(3):
        part = sk[0, 0, blk * 128:(blk + 1) * 128]
        assert part.unique(dim=0).shape[0] <= 4**D
        for c in range(D):
            assert len(part[:, c].unique()) <= 4
    # appending tokens never changes a finished block's codes
    sk2 = key_sketch(torch.cat([k, torch.randn(1, 1, 50, D)], 2), torch.ones(1, 350, dtype=torch.bool), 2, 128)
    torch.testing.assert_close(sk2[:, :, :256], sk[:, :, :256])


def test_sketch_at_16_bits_like_matches_exact_topk_when_sharp():
    """With 8-bit codes the sketch ranks like the true scores on a planted needle."""
    q, k, v, valid = _inputs(b=1, hq=2, hkv=1, s=512, seed=4)
    k[0, 0, 100] = q[0].sum(0)
    m = SparQSketch(0.5, bits=8, min_k=1, reallocate=False, local_fraction=0.0)
    s_hat = m.approx_scores(_x(q, k, v, valid)).sum(2)
    assert int(s_hat[0, 0].argmax()) == 100


def test_registry_specs_and_errors():
    assert parse_spec("sparq-sketch:bits=1:local=0") == ("sparq-sketch", {"bits": "1", "local": "0"})
    m = build_method("sparq-sketch:bits=1:local=0", "1/8", 64)
    assert (m.bits, m.local_fraction) == (1, 0.0)
    assert build_method("sparq:r=16", 0.25, 64).config.r == 16
    assert build_method("sparq", "1/8", 64).config.r == 8
    with pytest.raises(ValueError):
        build_method("nope", 0.5, 64)
    with pytest.raises(ValueError):
        build_method("h2o:bits=2", 0.5, 64)
    with pytest.raises(ValueError):
        build_method("topk", "3/2", 64)


def test_graph_safety_follows_what_the_kernels_cover():
    """The fast loop captures a CUDA graph only where attend has no host sync: SparQ's kernels take
    fp16/bf16 and the power-of-two head dims; elsewhere it runs the reference (host syncs)."""
    from sparq import SparQConfig
    from sparq.methods import Dense, SparQ

    m = SparQ(SparQConfig(r=2, k=8))
    assert m.graph_safe_for(torch.float16, 128) and m.graph_safe_for(torch.bfloat16, 64)
    assert not m.graph_safe_for(torch.float32, 128)
    assert not m.graph_safe_for(torch.float16, 80) and not m.graph_safe_for(torch.bfloat16, 96)
    assert Dense().graph_safe_for(torch.float32, 80)
