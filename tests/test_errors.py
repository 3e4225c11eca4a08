"""Bad input raises a clear ValueError/TypeError naming the problem."""

from __future__ import annotations

import pytest
import torch

from sparq import SparQConfig, dense_attention, sparq_attention

CFG = SparQConfig(r=2, k=4)


def ok(B=2, Hq=4, Hkv=2, S=10, d=8, dtype=torch.float32):
    return torch.randn(B, Hq, d, dtype=dtype), torch.randn(B, Hkv, S, d, dtype=dtype), torch.randn(B, Hkv, S, d, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(r=0, k=4), ValueError, "r must be >= 1"),
        (dict(r=2, k=0), ValueError, "k must be >= 1"),
        (dict(r=2, k=4, local_window=5), ValueError, "local_window"),
        (dict(r=2, k=4, local_window=-1), ValueError, "local_window"),
        (dict(r=2.5, k=4), TypeError, "r must be an int"),
        (dict(r=2, k=True), TypeError, "k must be an int"),
        (dict(r=2, k=4, reallocate="yes"), TypeError, "reallocate"),
        (dict(r=2, k=4, k_fraction=1.5), ValueError, "k_fraction"),
        (dict(r=2, k=4, local_fraction=float("nan")), ValueError, "local_fraction"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparQConfig(**kwargs)


def test_from_compression():
    c = SparQConfig.from_compression(8, head_dim=128)
    assert c.r == 16 and c.k_for(65536) == 4096 and c.k_for(100) == 64 and c.k_for(10) == 10
    assert c.local_for(65536) == 1024
    assert abs(c.data_fraction(65536, 128) - 1 / 8) < 1e-9
    assert c.data_fraction(50, 128) == 1.0  # k >= length: dense
    for bad in (0.5, 0, "8", float("nan")):
        with pytest.raises(ValueError, match="compression"):
            SparQConfig.from_compression(bad, head_dim=64)
    with pytest.raises(ValueError, match="head_dim"):
        SparQConfig.from_compression(8, head_dim=0)


@pytest.mark.parametrize("fn", ["sparq", "dense"])
def test_bad_tensors(fn):
    call = (lambda q, k, v, lengths=None: sparq_attention(q, k, v, CFG, lengths)) if fn == "sparq" else dense_attention
    q, k, v = ok()
    with pytest.raises(ValueError, match="query must have shape"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match="key must have shape"):
        call(q, k[0], v)
    with pytest.raises(ValueError, match="value shape"):
        call(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        call(torch.randn(2, 3, 8), k, v)
    with pytest.raises(ValueError, match="batch size"):
        call(q[:1], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        call(torch.randn(2, 4, 6), k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        call(q.half(), k, v)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        call(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        call(q.tolist(), k, v)
    with pytest.raises(ValueError, match="lengths must lie in"):
        call(q, k, v, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        call(q, k, v, torch.tensor([11, 5]))
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\]"):
        call(q, k, v, torch.tensor([5]))
    with pytest.raises(TypeError, match="integer tensor"):
        call(q, k, v, torch.tensor([5.0, 5.0]))
    with pytest.raises(TypeError, match="lengths must be an integer torch.Tensor"):
        call(q, k, v, [5, 5])
    with pytest.raises(ValueError, match="empty input"):
        call(q, k[:, :, :0], v[:, :, :0])
    bad = q.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(bad, k, v)
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(bad, k, v)


def test_bad_config_and_scale():
    q, k, v = ok()
    with pytest.raises(TypeError, match="config must be a SparQConfig"):
        sparq_attention(q, k, v, {"r": 2, "k": 4})
    for scale in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            sparq_attention(q, k, v, CFG, scale=scale)
