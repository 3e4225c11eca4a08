"""The PyTorch reference against an independent float64 loop implementation, and dense equality."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loop_reference import dense_loop, sparq_loop
from sparq import SparQConfig, dense_attention, sparq_attention
from sparq.reference import approx_scores, select_dims

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(seed, B, Hkv, g, S, d, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * g, d, generator=gen).to(dtype)
    K = torch.randn(B, Hkv, S, d, generator=gen).to(dtype)
    V = torch.randn(B, Hkv, S, d, generator=gen).to(dtype)
    lengths = torch.randint(1, S + 1, (B,), generator=gen)
    lengths[0] = S  # at least one full row
    return q, K, V, lengths


def _clear_selection(q, K, lengths, config) -> bool:
    """False when a selection boundary is a near-tie, where fp32 and fp64 may legitimately differ."""
    B, Hq, d = q.shape
    Hkv = K.shape[1]
    g = Hq // Hkv
    qg = q.double().reshape(B, Hkv, g, d)
    w = qg.abs().sum(2).sort(-1, descending=True).values
    if config.r < d and bool(((w[..., config.r - 1] - w[..., config.r]).abs() < 1e-6 * (1 + w[..., 0])).any()):
        return False
    valid = torch.arange(K.shape[2])[None] < lengths[:, None]
    s_hat = approx_scores(q.double(), K.double(), valid, config.r, 1 / math.sqrt(d))
    total = s_hat.sum(2)
    for b in range(B):
        n = int(lengths[b])
        k_b, local_b = config.k_for(n), config.local_for(n)
        if k_b >= n:
            continue
        rest = total[b, :, : n - local_b].sort(-1, descending=True).values
        m = k_b - local_b
        if m < rest.shape[-1] and bool(((rest[:, m - 1] - rest[:, m]).abs() < 1e-5).any()):
            return False
    return True


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Hkv=st.integers(1, 3),
    g=st.sampled_from([1, 2, 3, 4]),
    S=st.integers(1, 40),
    d=st.sampled_from([4, 8, 16]),
    r=st.integers(1, 20),
    k=st.integers(1, 45),
    local_frac=st.floats(0, 1),
    reallocate=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_reference_matches_float64_loop(seed, B, Hkv, g, S, d, r, k, local_frac, reallocate, dtype):
    config = SparQConfig(r=r, k=k, local_window=int(local_frac * k), reallocate=reallocate)
    q, K, V, lengths = _inputs(seed, B, Hkv, g, S, d, dtype)
    assume(_clear_selection(q, K, lengths, config))
    out = sparq_attention(q, K, V, config, lengths)
    assert out.dtype == dtype and out.shape == q.shape
    expected = sparq_loop(q, K, V, config, lengths)
    err = (out.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * (1 + expected.abs().max().item()), err


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    S=st.integers(2, 60),
    k_fraction=st.floats(0.01, 0.6),
    local_fraction=st.floats(0, 1),
)
def test_growing_budget_matches_loop(seed, S, k_fraction, local_fraction):
    config = SparQConfig(r=3, k=2, k_fraction=k_fraction, local_fraction=local_fraction)
    q, K, V, lengths = _inputs(seed, 2, 2, 2, S, 8, torch.float32)
    assume(_clear_selection(q, K, lengths, config))
    out = sparq_attention(q, K, V, config, lengths)
    torch.testing.assert_close(out.double(), sparq_loop(q, K, V, config, lengths), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 3, 4])
def test_k_at_least_length_is_exactly_dense(dtype, g):
    seed = torch.seed() % 2**31
    q, K, V, lengths = _inputs(seed, 3, 2, g, 37, 16, dtype)
    for reallocate in (True, False):
        config = SparQConfig(r=2, k=37, local_window=5, reallocate=reallocate)
        assert torch.equal(sparq_attention(q, K, V, config, lengths), dense_attention(q, K, V, lengths)), seed


def test_dense_matches_loop():
    q, K, V, lengths = _inputs(7, 3, 2, 4, 23, 8, torch.float32)
    torch.testing.assert_close(dense_attention(q, K, V, lengths).double(), dense_loop(q, K, V, lengths),
                               atol=1e-5, rtol=1e-5)


def test_padding_is_never_attended():
    q, K, V, _ = _inputs(3, 2, 2, 2, 30, 8, torch.float32)
    lengths = torch.tensor([30, 12])
    config = SparQConfig(r=2, k=6, local_window=2)
    base = sparq_attention(q, K, V, config, lengths)
    K2, V2 = K.clone(), V.clone()
    K2[1, :, 12:] = 1e4 * torch.randn_like(K2[1, :, 12:])
    V2[1, :, 12:] = float("nan")
    torch.testing.assert_close(sparq_attention(q, K2, V2, config, lengths), base)


def test_gqa_group_shares_dims_and_scale_argument():
    q, K, _, _ = _inputs(5, 1, 2, 4, 8, 16, torch.float32)
    dims = select_dims(q.reshape(1, 2, 4, 16), 3)
    assert dims.shape == (1, 2, 3)
    w = q.reshape(1, 2, 4, 16).abs().sum(2)
    assert set(dims[0, 1].tolist()) == set(w[0, 1].topk(3).indices.tolist())
    q, K, V, lengths = _inputs(9, 2, 2, 2, 20, 8, torch.float32)
    config = SparQConfig(r=8, k=20)
    torch.testing.assert_close(sparq_attention(q, K, V, config, lengths, scale=0.3),
                               dense_loop(q, K, V, lengths, scale=0.3).float(), atol=1e-5, rtol=1e-5)


def test_key_t_and_value_sum_give_the_same_result():
    from sparq.reference import sparq_reference

    q, K, V, lengths = _inputs(11, 2, 2, 3, 25, 8, torch.float32)
    valid = torch.arange(25)[None] < lengths[:, None]
    config = SparQConfig(r=3, k=7, local_window=2)
    plain = sparq_reference(q, K, V, config, valid, 8**-0.5)
    vsum = (V * valid[:, None, :, None]).sum(2)
    cached = sparq_reference(q, K, V, config, valid, 8**-0.5, key_t=K.transpose(-1, -2).contiguous(), value_sum=vsum)
    torch.testing.assert_close(cached, plain)


def test_zero_query_is_handled():
    q, K, V, lengths = _inputs(2, 1, 1, 2, 10, 8, torch.float32)
    q[0, 0] = 0
    out = sparq_attention(q, K, V, SparQConfig(r=2, k=3), lengths)
    assert torch.isfinite(out).all()


def test_ties_do_not_depend_on_padding():
    """A zero query makes every score equal: left padding must not change what is selected."""
    q, K, V, _ = _inputs(torch.seed() % 2**31, 1, 2, 2, 20, 8, torch.float32)
    q[:, :2] = 0  # the first KV head's group: all scores tie
    config = SparQConfig(r=3, k=7, local_window=2)
    alone = sparq_attention(q, K, V, config)
    pad = torch.randn(1, 2, 9, 8)
    Kp, Vp = torch.cat([pad, K], 2), torch.cat([pad, V], 2)
    from sparq.reference import sparq_reference

    valid = torch.arange(29)[None] >= 9
    torch.testing.assert_close(sparq_reference(q, Kp, Vp, config, valid, 8**-0.5), alone)
    torch.testing.assert_close(alone.double(), sparq_loop(q, K, V, config, torch.tensor([20])), atol=1e-5, rtol=1e-5)
