"""One device call: GPU correctness tests, a per-kernel time breakdown, then the benchmark.

Usage (on the GPU machine, from the repository root):
  PYTHONPATH=src python benchmarks/kernel_check.py [--no-tests] [--no-bench] [--profile] [--shapes all|quick]
Writes JSON and logs under $OUT (or benchmarks/results when OUT is unset).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch


def profile(shapes):
    """Device time per kernel of one eager SparQ step (torch.profiler), for the given shapes."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from sparq.bench import sparq_bytes
    from sparq.config import SparQConfig
    from sparq.kernel_cache import KernelCacheLayer
    from sparq.kernels.dispatch import _WORKSPACES, sparq_decode

    for label, batch, hq, hkv, seq, d, dtype in shapes:
        cfg = SparQConfig(r=d // 8, k=seq // 16, k_fraction=1 / 16, local_fraction=0.25)
        cache = KernelCacheLayer(batch, hkv, d, seq, dtype, "cuda")
        cache.key.normal_()
        cache.value.normal_()
        cache.key_t.copy_(cache.key.transpose(-1, -2))
        cache.lengths.fill_(seq)
        q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        for _ in range(3):
            sparq_decode(q, cache.key, cache.value, cfg, cache.lengths, key_t=cache.key_t, value_sum=cache.value_sum)
        torch.cuda.synchronize()
        n = 10
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                flush.zero_()
                sparq_decode(q, cache.key, cache.value, cfg, cache.lengths, key_t=cache.key_t, value_sum=cache.value_sum)
            torch.cuda.synchronize()
        elt = torch.finfo(dtype).bits // 8
        print(f"--- {label} B={batch} S={seq} {dtype}: floor bytes {sparq_bytes(batch, hkv, seq, d, elt, cfg) / 1e6:.1f} MB")
        evs = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
        for e in evs[:14]:
            t = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            if t <= 0:
                continue
            print(f"  {t / n:9.1f} us  x{e.count // n:<3d} {e.key[:90]}")
        del cache, q, flush
        _WORKSPACES.clear()
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--shapes", default="all")
    args = ap.parse_args()
    out = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out, exist_ok=True)
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    if not args.no_tests:
        t = time.time()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels.py", "-p", "no:cacheprovider"],
                             env=dict(os.environ, PYTHONPATH="src"))
        print(f"tests rc={rc} in {time.time() - t:.0f}s", flush=True)
    from sparq.bench import DEFAULT_SHAPES, bench_kernels

    shapes = DEFAULT_SHAPES
    if args.shapes == "quick":
        shapes = [DEFAULT_SHAPES[i] for i in (0, 2, 4, 9)]
    if args.profile:
        profile([DEFAULT_SHAPES[i] for i in (2, 4, 9)])
    if not args.no_bench:
        bench_kernels(shapes, out_dir=out)


if __name__ == "__main__":
    main()
