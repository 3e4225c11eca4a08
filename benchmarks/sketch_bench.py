"""GPU micro-benchmark: one `sparq-sketch` decode step on the kernels (1 and 2 bits) against the
paper's SparQ step (DecodePlan over Kᵀ) and the best dense SDPA backend, same run, same cache.

Usage (GPU machine, repository root; ~1-2 minutes on an H200):
  PYTHONPATH=src python benchmarks/sketch_bench.py [--shapes all|quick] [--fraction 0.125]
Prints a table and writes sketch-<device>-<UTC time>.json to $OUT (or benchmarks/results): device,
versions, per shape the medians (us, `triton.testing.do_bench` of the CUDA-graphed step, L2 flushed
between runs), k of each method and the floor bytes (what each method must read per step).

Budgets at the same target fraction f of dense data (the methods' own accounting):
  paper   r = d * f, k = S * f / 2, local window k / 4, reallocation on (as `sparq bench kernels`)
  sketch  SparQSketch(f, bits, block 128): k = rows_for(f, S, d, overhead = sketch), the default
          method's settings (no local window, no reallocation; --paper-settings: local k / 4,
          reallocation on, as JSON before 2026-11-30 16:00 UTC)
Floors (bytes per KV head and step): dense 2 S d e; paper S r e + 2 k d e + 4 d;
sketch S d bits / 8 + (S / block) 2 d e + 2 k d e + 4 d (e = element bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

def _shapes():
    """The issue's six target shapes, taken from `sparq bench kernels`' list (label, B, Hq, Hkv, S, d, dtype)."""
    from sparq.tools.bench_kernels import DEFAULT_SHAPES

    wanted = {("MHA", 1, 4096), ("MHA", 8, 65536), ("MHA", 32, 16384), ("GQA", 1, 32768), ("GQA", 8, 32768),
              ("GQA", 16, 65536)}
    return [s for s in DEFAULT_SHAPES if (s[0], s[1], s[4]) in wanted]


def _graphed(fn):
    from sparq.tools.bench_kernels import _graphed as g

    return g(fn)


def _kernel_profile(fn, steps: int = 5) -> dict[str, float]:
    """Median-free per-kernel GPU time of one un-graphed step (us, mean over `steps`), by kernel name:
    where the step's time goes, launch gaps excluded."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t > 0 and ev.key and not ev.key.startswith(("cudaLaunch", "cudaStream", "cudaGraph")):
            out[ev.key[:60]] = round(t / steps, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(_graphed(fn), warmup=25, rep=100, return_mode="median") * 1e3


def prefilled_sketch(cache, bits, block):
    """A `SketchState` of `bits`-bit codes in `block`-position blocks over the whole of `cache` (a full
    `random_cache`), prefilled row by row so the PyTorch prefill's fp32 temporaries stay small."""
    from sparq.kernels.sketch_state import SketchState

    batch, hkv, seq, d = cache.key.shape
    st = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=cache.key.dtype, device=cache.key.device)
    for b in range(batch):
        st_b = SketchState(1, hkv, d, seq, bits=bits, block=block, dtype=cache.key.dtype, device=cache.key.device)
        st_b.prefill(cache.key[b:b + 1], cache.lengths[b:b + 1])
        st.codes[b].copy_(st_b.codes[0])
        st.lo[b].copy_(st_b.lo[0])
        st.hi[b].copy_(st_b.hi[0])
        del st_b
    return st


def sketch_step(cache, q, out, bits, fraction, block, paper_settings=False):
    """(method, SketchState, DecodePlan, step) of the sketch method on `cache` (a full `random_cache`):
    the default method's settings (no local window, no reallocation) or, with paper_settings, local
    k / 4 and reallocation on. `step()` runs one un-graphed decode step into `out`."""
    from sparq.kernels.dispatch import DecodePlan
    from sparq.kernels.sketch_scores import SketchConfig
    from sparq.methods.sketch import SparQSketch

    batch, hkv, seq, d = cache.key.shape
    hq, dtype = q.shape[1], q.dtype
    m = (SparQSketch(fraction, bits=bits, block=block) if paper_settings  # local k/4, reallocation on
         else SparQSketch(fraction, bits=bits, block=block, local_fraction=0.0, reallocate=False))  # the default
    st = prefilled_sketch(cache, bits, block)
    plan = DecodePlan(batch, hq, hkv, d, seq, SketchConfig.from_method(m, d), q.device, dtype)
    step = (lambda plan=plan, c=cache, st=st: plan.run(q, c.key, c.value, c.lengths,
                                                        value_sum=c.value_sum, out=out, sketch=st))
    return m, st, plan, step


def run_shape(label, batch, hq, hkv, seq, d, dtype, fraction, block, with_paper=True, paper_settings=False,
              kernel_profile=False):
    from sparq.tools.bench_kernels import _dense_candidates, random_cache
    from sparq.config import SparQConfig
    from sparq.kernels.dispatch import DecodePlan

    elt = torch.finfo(dtype).bits // 8
    cache, q = random_cache(batch, hq, hkv, seq, d, dtype)
    out = torch.empty_like(q)
    row = {"shape": label, "B": batch, "Hq": hq, "Hkv": hkv, "S": seq, "d": d, "dtype": str(dtype).split(".")[-1],
           "us": {}, "k": {}, "floor_bytes": {}}
    heads = batch * hkv
    row["floor_bytes"]["dense"] = heads * 2 * seq * d * elt
    dense = _dense_candidates(q, cache.key, cache.value, hq != hkv)
    for name, fn in dense.items():
        row["us"][f"dense-{name}"] = _bench(fn)
    if with_paper:
        cfg = SparQConfig(r=max(1, round(d * fraction)), k=16, k_fraction=fraction / 2, local_fraction=0.25)
        plan = DecodePlan(batch, hq, hkv, d, seq, cfg, q.device, dtype)
        row["k"]["paper"] = cfg.k_for(seq)
        row["floor_bytes"]["paper"] = heads * (seq * cfg.r * elt + 2 * cfg.k_for(seq) * d * elt + 4 * d)
        row["us"]["paper"] = _bench(lambda plan=plan, c=cache: plan.run(q, c.key, c.value, c.lengths, key_t=c.key_t,
                                                                         value_sum=c.value_sum, out=out))
        del plan
    cache.derived.key_t_buf = None  # the sketch method does not keep Kᵀ
    torch.cuda.empty_cache()
    for bits in (1, 2):
        m, st, plan, step = sketch_step(cache, q, out, bits, fraction, block, paper_settings)
        k = m.k_for(seq, d)
        name = f"sketch{bits}b"
        row["k"][name] = k
        row["floor_bytes"][name] = heads * (seq * d * bits // 8 + (seq // block) * 2 * d * elt + 2 * k * d * elt + 4 * d)
        row["state_bytes_per_token_per_kv_head"] = row.get("state_bytes_per_token_per_kv_head", {})
        row["state_bytes_per_token_per_kv_head"][name] = st.bytes_per_position()
        row["us"][name] = _bench(step)
        if kernel_profile and bits == 2:
            row["kernels_us_sketch2b"] = _kernel_profile(step)
        # step 1 alone (the scorer + budgets), to see where the time goes
        import triton

        from sparq.kernels.select import _budgets_kernel
        from sparq.kernels.sketch_scores import score_sketch

        def step1(plan=plan, c=cache, st=st):
            _budgets_kernel[(plan.batch,)](c.lengths, plan.budget_table, plan.k_b, plan.local_b, plan.counts,
                                           plan.num_kv_heads, H2_PAD=triton.next_power_of_2(2 * plan.num_kv_heads))
            score_sketch(plan, q, c.key, st, c.lengths, c.lengths, False, 1 / math.sqrt(d))
        row["us"][f"{name}-step1"] = _bench(step1)
        row["floor_bytes"][f"{name}-step1"] = heads * (seq * d * bits // 8 + (seq // block) * 2 * d * elt
                                                       + 4 * (hq // hkv) * seq)
        del plan, st
        torch.cuda.empty_cache()
    return row  # the cache is freed here (main empties torch's allocator cache before the next shape)


def read_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    t = _bench(lambda x=x: x.amax())
    del x
    return (2 << 30) / (t * 1e-6) / 1e12


def main() -> None:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all", choices=["all", "quick", "mha", "gqa"])
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--no-paper", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also each kernel's time in the 2-bit step (torch.profiler)")
    ap.add_argument("--paper-settings", action="store_true",
                    help="sketch rows with a local window of k/4 and reallocation on (as before 2026-11-30's "
                         "default switch) instead of the default method's settings")
    args = ap.parse_args()
    shapes = _shapes()
    shapes = {"all": shapes, "quick": [shapes[0], shapes[3]], "mha": [x for x in shapes if x[0] == "MHA"],
              "gqa": [x for x in shapes if x[0] == "GQA"]}[args.shapes]
    device = torch.cuda.get_device_name(0)
    bw = read_bandwidth()
    print(f"{device}  torch {torch.__version__}  triton {triton.__version__}  read {bw:.2f} TB/s  f={args.fraction:g}",
          flush=True)
    rows = []
    t0 = time.time()
    hdr = (f"{'shape':17s} {'B':>3s} {'S':>6s} | {'dense':>8s} {'paper':>8s} {'sk1b':>8s} {'sk2b':>8s} | "
           f"{'x paper':>7s} {'x sk1':>6s} {'x sk2':>6s} | {'sk2 step1':>9s} {'sk2 %floor':>10s}")
    print(hdr)
    for shape in shapes:
        row = run_shape(*shape, fraction=args.fraction, block=args.block, with_paper=not args.no_paper,
                        paper_settings=args.paper_settings, kernel_profile=args.profile)
        rows.append(row)
        torch.cuda.empty_cache()
        if args.profile:
            print("   kernels (us): " + ", ".join(f"{k.split('(')[0][:28]} {v}" for k, v in row["kernels_us_sketch2b"].items()))
        us = row["us"]
        dense = min(v for k, v in us.items() if k.startswith("dense-"))
        row["best_dense_us"] = dense
        paper = us.get("paper", float("nan"))
        floor2 = row["floor_bytes"]["sketch2b"] / (bw * 1e12) * 1e6
        print(f"{row['shape']:17s} {row['B']:3d} {row['S']:6d} | {dense:8.1f} {paper:8.1f} {us['sketch1b']:8.1f} "
              f"{us['sketch2b']:8.1f} | {dense / paper:6.2f}x {dense / us['sketch1b']:5.2f}x {dense / us['sketch2b']:5.2f}x"
              f" | {us['sketch2b-step1']:9.1f} {100 * floor2 / us['sketch2b']:9.0f}%", flush=True)
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "read_bandwidth_TBps": bw, "fraction": args.fraction, "block": args.block,
              "sketch_settings": ("local k/4, reallocation on" if args.paper_settings
                                  else "default method: no local window, no reallocation"),
              "timing": "triton.testing.do_bench median of the CUDA-graphed step (L2 flushed), us",
              "rows": rows, "seconds": time.time() - t0}
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"sketch-{device.replace(' ', '_')}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
