"""Run the default method's decode step (sketch scorer + selection + gather) un-graphed a few times
at one shape, for a profiler (Nsight Compute) to read each kernel's counters.

Usage (GPU machine, repository root):
  ncu --clock-control none -k regex:"_sample|_emit|_resolve|_compact|_sketch" --launch-count 12 \
      --section SpeedOfLight --section WarpStateStats --section Occupancy \
      python benchmarks/selection_probe.py --shape "GQA 8 32768"
Prints each launch's median time (torch.profiler-free: CUDA events over the whole step) so that a
run without the profiler is a quick sanity check.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    from sketch_bench import _shapes, sketch_step

    from sparq.tools.bench_kernels import random_cache

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="GQA 8 32768", help="'<MHA|GQA> <B> <S>', one of sketch_bench's shapes")
    ap.add_argument("--bits", type=int, default=2, choices=[1, 2])
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    kind, b, s = args.shape.split()
    shape = next((x for x in _shapes() if (x[0], x[1], x[4]) == (kind, int(b), int(s))), None)
    if shape is None:
        raise SystemExit(f"--shape must be one of {[f'{x[0]} {x[1]} {x[4]}' for x in _shapes()]}")
    _, batch, hq, hkv, seq, d, dtype = shape[:7]
    cache, q = random_cache(batch, hq, hkv, seq, d, dtype)
    cache.derived.key_t_buf = None
    out = torch.empty_like(q)
    _, _, _, step = sketch_step(cache, q, out, args.bits, args.fraction, 128)
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(e) * 1e3)
    print(f"{args.shape} {args.bits}b: un-graphed step {sorted(times)[len(times) // 2]:.1f} us (median of {args.steps})")


if __name__ == "__main__":
    main()
