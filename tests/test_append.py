"""The one-launch cache append (Triton, interpreter on the CPU) equals the PyTorch ops it replaces."""

from __future__ import annotations

import pytest
import torch

from sparq import kernels
from sparq.caches.static import KernelCacheLayer

pytestmark = pytest.mark.skipif(not kernels.available("cpu") and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 on the CPU, or a GPU")


def _device() -> str:
    return "cpu" if kernels.available("cpu") else "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("keep_key_t", [True, False])
def test_fused_append_matches_torch(dtype, keep_key_t):
    dev = _device()
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh inputs each run; printed when it fails
    print(f"test_fused_append_matches_torch seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    B, H, S, d = 3, 2, 13, 32
    layers = [KernelCacheLayer(B, H, d, S, dtype, dev, keep_key_t=keep_key_t) for _ in range(2)]
    lengths = torch.tensor([0, 7, S - 2], dtype=torch.int32)  # a row that fills up and wraps
    key, value = (torch.randn(B, H, S, d, generator=gen).to(dev) for _ in range(2))
    for c in layers:
        c.prefill(key, value, lengths.to(dev))
    layers[1]._fused_append = lambda key: False  # the PyTorch path
    for step in range(4):
        # a non-contiguous [B, Hkv, 1, d] view, as the decode loop produces
        k = torch.randn(B, 1, H, d, generator=gen).to(dev).transpose(1, 2)
        v = torch.randn(B, 1, H, d, generator=gen).to(dev).transpose(1, 2)
        for c in layers:
            c.append(k, v)
    a, b = layers
    assert torch.equal(a.lengths, b.lengths) and a.lengths.tolist() == [4, 11, S]
    assert torch.equal(a.key, b.key) and torch.equal(a.value, b.value)
    if keep_key_t:
        assert torch.equal(a.key_t, b.key_t)
        assert torch.equal(a.key_t, a.key.transpose(-1, -2))
    torch.testing.assert_close(a.value_sum, b.value_sum, rtol=1e-5, atol=1e-5)
    # the running V sum stays the sum over the valid rows, also for the row that wrapped
    valid = torch.arange(S, device=dev)[None, :] < a.lengths[:, None]
    torch.testing.assert_close(a.value_sum, (a.value.float() * valid[:, None, :, None]).sum(2), rtol=1e-4, atol=1e-4)


def test_append_at_explicit_positions_without_advancing():
    dev = _device()
    c = KernelCacheLayer(2, 1, 16, 8, torch.float32, dev)
    pos = torch.tensor([3, 5], dtype=torch.int32, device=dev)
    k = torch.ones(2, 1, 16, device=dev)
    c.append(k, 2 * k, positions=pos, advance=False)
    assert c.lengths.tolist() == [0, 0]
    assert c.key[0, 0, 3].eq(1).all() and c.key[1, 0, 5].eq(1).all() and c.value[1, 0, 5].eq(2).all()
    assert c.key.abs().sum() == 2 * 16
