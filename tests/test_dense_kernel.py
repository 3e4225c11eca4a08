"""The split-K dense decode kernel (the fast loop's dense baseline) against the reference."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparq import dense_attention, kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs triton (GPU or interpreter)")


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_decode_matches_reference(g, dtype):
    from sparq.kernels.dense import dense_decode

    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, S, d = 3, 2, 203, 32
    q = torch.randn(B, Hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, S, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(B, Hkv, S, d, generator=gen).to(dtype).to(DEVICE)
    lengths = torch.tensor([203, 77, 1]).to(DEVICE)
    k[1, :, 77:] = float("nan")  # padding must never be read into the result
    v[1, :, 77:] = float("nan")
    got = dense_decode(q, k, v, lengths, d**-0.5)
    expected = dense_attention(q.cpu(), k.cpu(), v.cpu(), lengths.cpu())
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=tol, rtol=tol, msg=f"seed {seed}")
