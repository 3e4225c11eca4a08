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

    from sparq.tools.bench_kernels import random_cache, sparq_bytes
    from sparq.config import SparQConfig
    from sparq.kernels.dispatch import DecodePlan

    for shape in shapes:
        label, batch, hq, hkv, seq, d, dtype = shape[:7]
        kd = shape[7] if len(shape) > 7 else 16
        cfg = SparQConfig(r=d // 8, k=seq // kd, k_fraction=1 / kd, local_fraction=0.25)
        cache, q = random_cache(batch, hq, hkv, seq, d, dtype)
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        plan = DecodePlan(batch, hq, hkv, d, seq, cfg, q.device, dtype)
        for _ in range(3):
            plan.run(q, cache.key, cache.value, cache.lengths, key_t=cache.key_t, value_sum=cache.value_sum)
        torch.cuda.synchronize()
        n = 10
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                flush.zero_()
                plan.run(q, cache.key, cache.value, cache.lengths, key_t=cache.key_t, value_sum=cache.value_sum)
            torch.cuda.synchronize()
        elt = torch.finfo(dtype).bits // 8
        print(f"--- {label} B={batch} S={seq} k=S/{kd} {dtype}: floor bytes {sparq_bytes(batch, hkv, seq, d, elt, cfg) / 1e6:.1f} MB")
        evs = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
        for e in evs[:14]:
            t = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            if t <= 0:
                continue
            print(f"  {t / n:9.1f} us  x{e.count // n:<3d} {e.key[:90]}")
        del cache, q, flush, plan
        torch.cuda.empty_cache()


def _setup(label, batch, hq, hkv, seq, d, dtype, k_div=16):
    from sparq.tools.bench_kernels import random_cache
    from sparq.config import SparQConfig

    cfg = SparQConfig(r=d // 8, k=seq // k_div, k_fraction=1 / k_div, local_fraction=0.25)
    cache, q = random_cache(batch, hq, hkv, seq, d, dtype)
    return cfg, cache, q


def sweep(shapes, variants, tag="sweep"):
    """Time the whole graphed SparQ step per launch-geometry variant (dispatch.Tuning fields); prints a
    line per shape and writes $OUT/<tag>-<device>-<time>.json (device, versions, shapes, medians)."""
    import json

    import triton
    from triton.testing import do_bench

    from sparq.tools.bench_kernels import _graphed
    from sparq.kernels import dispatch

    rows = []
    for shape in shapes:
        cfg, cache, q = _setup(*shape)
        out = torch.empty_like(q)
        line = f"sweep {shape[0]} B={shape[1]} S={shape[4]}:"
        row = {"shape": [str(x) for x in shape], "k": cfg.k_for(shape[4]), "r": cfg.r, "us": {}}
        rows.append(row)
        for name, var in variants:
            plan = dispatch.DecodePlan(shape[1], shape[2], shape[3], shape[5], shape[4], cfg, q.device, shape[6],
                                       dispatch.DEFAULT_TUNING.with_(**var))
            fn = lambda plan=plan: plan.run(q, cache.key, cache.value, cache.lengths, key_t=cache.key_t,
                                            value_sum=cache.value_sum, out=out)
            t = do_bench(_graphed(fn), warmup=25, rep=150, return_mode="median")
            line += f"  {name} {t * 1e3:.1f}"
            row["us"][name] = t * 1e3
        print(line, flush=True)
        del cache, q, out
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(0)
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "timing": "do_bench median of the CUDA-graphed step, us", "variants": dict(variants), "rows": rows}
    path = os.path.join(os.environ.get("OUT", "benchmarks/results"),
                        f"{tag}-{device.replace(' ', '_')}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def diag(shape):
    """Registers, spills and vector loads of the step-1 kernel."""
    from sparq.kernels.approx_scores import score_transposed_keys
    from sparq.kernels.dispatch import DecodePlan

    cfg, cache, q = _setup(*shape)
    _, batch, hq, hkv, seq, d, dtype = shape
    ws = DecodePlan(batch, hq, hkv, d, seq, cfg, q.device, dtype)
    ck = score_transposed_keys(ws, q, cache.key_t, cache.lengths, cache.lengths, False, 1 / d ** 0.5)
    ptx = ck.asm.get("ptx", "")
    print(f"diag {shape[0]} B={batch}: regs {getattr(ck, 'n_regs', '?')} spills {getattr(ck, 'n_spills', '?')} "
          f"ld.v4 {ptx.count('.v4.')} ld.v2 {ptx.count('.v2.')} ld.global {ptx.count('ld.global')} "
          f"st.global {ptx.count('st.global')} chunk1 {ws.chunk1} nsplit1 {ws.n_split1} nsplit2 {ws.n_split2}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--pivot-sweep", action="store_true", help="selection search: bisection vs multi-pivot")
    ap.add_argument("--plan-sweep", action="store_true", help="long contexts: sample size vs resolve capacity")
    ap.add_argument("--det-sweep", action="store_true", help="deterministic (ordered) selection vs atomic order")
    ap.add_argument("--no-long", action="store_true", help="skip the 131072-position shapes")
    ap.add_argument("--legacy", action="store_true",
                    help="also bench the long shapes with the old selection sizes (2048/4096 samples, CAP 4096)")
    args = ap.parse_args()
    out = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out, exist_ok=True)
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    if not args.no_tests:
        t = time.time()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels.py", "-p", "no:cacheprovider"],
                             env=dict(os.environ, PYTHONPATH="src"))
        print(f"tests rc={rc} in {time.time() - t:.0f}s", flush=True)
    from sparq.tools.bench_kernels import DEFAULT_SHAPES, LONG_SHAPES, bench_kernels

    shapes = DEFAULT_SHAPES
    if args.shapes == "quick":
        shapes = [DEFAULT_SHAPES[i] for i in (0, 2, 4, 9)]
    if args.profile:
        for i in (2, 4, 9):
            diag(DEFAULT_SHAPES[i])
        profile([DEFAULT_SHAPES[i] for i in (2, 4, 9)] + ([] if args.no_long else LONG_SHAPES[1:]))
    if args.sweep:
        variants = [
            ("base", {}),
            ("s32g32", dict(score_blocks_per_sm=32, gather_blocks_per_sm=32)),
            ("bs256", dict(score_block=256)),
            ("gblk32", dict(gather_block=32)),
            ("sw16", dict(select_warps=16)),
        ]
        sweep([DEFAULT_SHAPES[i] for i in (2, 4, 5, 9)], variants)
    if args.pivot_sweep:
        variants = [("p8", {}), ("p1", dict(search_pivots=1)), ("p4", dict(search_pivots=4)),
                    ("p8nb", dict(search_budget=None)), ("p16nb", dict(search_pivots=16, search_budget=None))]
        sweep([("GQA", 1, 32, 8, 4096, 128, torch.bfloat16)] + [DEFAULT_SHAPES[i] for i in (0, 4, 7, 8)]
              + ([] if args.no_long else [LONG_SHAPES[0], LONG_SHAPES[1]]), variants, "pivot-sweep")
    if args.det_sweep:
        variants = [("det", {}), ("atomic", dict(deterministic=False)), ("det-p1", dict(search_pivots=1))]
        sweep([("GQA", 1, 32, 8, 4096, 128, torch.bfloat16)] + [DEFAULT_SHAPES[i] for i in (0, 4, 5, 6, 8, 9)]
              + [LONG_SHAPES[0], LONG_SHAPES[1]], variants, "det-sweep")
    if args.plan_sweep:
        variants = [("auto", {}), ("s8k-c4k", dict(samples=8192, select_cap=4096)),
                    ("s16k-c4k", dict(samples=16384, select_cap=4096)),
                    ("s16k-c4k-t255", dict(samples=16384, select_cap=4096, select_tol=255)),
                    ("s8k-c8k", dict(samples=8192, select_cap=8192))]
        sweep(LONG_SHAPES[:3] + [("GQA", 1, 32, 8, 65536, 128, torch.bfloat16)], variants, "plan-sweep")
    if not args.no_bench:
        bench_kernels(shapes, out_dir=out)
        if not args.no_long:
            bench_kernels(LONG_SHAPES, out_dir=out, tag="-long")
            if args.legacy:
                print("--legacy (the selection sizes before the long-context fix) is gone: plans now take "
                      "a Tuning value; sweep those sizes with --plan-sweep")


if __name__ == "__main__":
    main()
