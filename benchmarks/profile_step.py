"""Where a decode step's time goes: kernel time by category for dense and SparQ in the fast loop.

For each (batch, context) of the Llama-3-8B shape (random weights), fills the cache with random
K/V (no prefill: only the step is profiled), times the CUDA-graph step, then profiles a few
un-graphed steps with torch.profiler and sums kernel time per category (matmul, attention,
SparQ kernels, cache append, fused elementwise, other). The gap between the graph step and the
sum of kernel time is idle time between dependent kernels. Run on the device machine:
    PYTHONPATH=src python benchmarks/profile_step.py 1:4096 8:32768 1:131072
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparq import SparQConfig
from sparq.tools.bench_generate import build_model
from sparq.fast import FastDecoder
from sparq.methods import Dense


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "gemv", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk")):
        return "matmul"
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention_kernel", "efficient_attention", "sdpa")) \
            and "_gather_attention" not in n:
        return "dense attention"
    if any(s in n for s in ("_budgets", "_query_prep", "_transposed_key", "_sample", "_emit", "_resolve",
                            "_gather_attention", "_combine", "_scores")):
        return "sparq kernels"
    if any(s in n for s in ("scatter", "gather", "_append")):
        return "cache append"
    if n.startswith("triton_"):
        return "fused elementwise (inductor)"
    return "other"


def fill_random(dec: FastDecoder, context: int) -> None:
    torch.manual_seed(0)
    for c in dec.cache:
        c.key.normal_()
        c.value.normal_()
        c.key[:, :, context:] = 0
        c.value[:, :, context:] = 0
        if c.key_t is not None:
            c.key_t.copy_(c.key.transpose(-1, -2))
        c.value_sum.copy_(c.value.float().sum(2))
        c.lengths.fill_(context)
    dec.positions.fill_(context)
    dec.tokens.random_(0, 1000)


def main(specs: list[str]) -> None:
    max_ctx = max(int(s.split(":")[1]) for s in specs) + 64
    lm = build_model("llama3-8b", max_ctx)
    results = []
    for spec in specs:
        batch, context = (int(x) for x in spec.split(":"))
        dec = FastDecoder(lm, Dense(), batch=batch, max_len=context + 40, keep_key_t=True)
        fill_random(dec, context)
        snap = dec.snapshot()
        for label, method in (("dense", Dense()), ("sparq 1/8", SparQConfig.from_compression(8, head_dim=128))):
            dec.restore(snap)
            dec.use(method)
            dec.decode(2)
            dec.restore(snap)
            _, secs = dec.decode(24)
            graph_ms = secs / 24 * 1e3
            dec.restore(snap)
            with torch.inference_mode():
                dec._step()
                torch.cuda.synchronize()
                steps = 3
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        dec._step()
                    torch.cuda.synchronize()
            per_cat: dict[str, float] = collections.defaultdict(float)
            per_name: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
            n_kernels = 0
            for ev in prof.events():
                if ev.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
                per_cat[category(ev.name)] += us / steps
                per_name[ev.name][0] += us / steps
                per_name[ev.name][1] += 1
                n_kernels += 1
            total_us = sum(per_cat.values())
            print(f"\n=== B={batch} S={context} {label}: graph step {graph_ms:.3f} ms, kernel time {total_us / 1e3:.3f} ms, "
                  f"{n_kernels / steps:.0f} kernels/step, idle {graph_ms - total_us / 1e3:.3f} ms", flush=True)
            for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
                print(f"  {cat:<30s} {us / 1e3:8.3f} ms", flush=True)
            top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:18]
            for name, (us, cnt) in top:
                print(f"    {us:9.1f} us  x{cnt // steps:<4d} {name[:110]}", flush=True)
            results.append({"batch": batch, "context": context, "method": label, "graph_ms": graph_ms,
                            "kernel_ms": total_us / 1e3, "kernels_per_step": n_kernels / steps,
                            "categories_ms": {k: v / 1e3 for k, v in per_cat.items()},
                            "top_kernels_us": {k[:160]: v[0] for k, v in top}})
        del dec, snap
        torch.cuda.empty_cache()
    out = os.environ.get("OUT", "benchmarks/results")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = os.path.join(out, f"profile-step-{torch.cuda.get_device_name().replace(' ', '_')}-{stamp}.json")
    with open(path, "w") as f:
        import triton

        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "cuda": torch.version.cuda, "rows": results}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1:] or ["1:4096", "8:32768", "1:131072"])
