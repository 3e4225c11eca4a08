"""Kernel benchmark: SparQ decode step on the Triton kernels vs the best dense decode in the same run.

`bench_kernels()` times, per shape, one SparQ decode step (the whole step: budgets, step 1,
selection, gather attention, combine; captured in a CUDA graph and replayed) and dense decode
attention through PyTorch SDPA with the flash, cuDNN and memory-efficient backends (each captured
in a graph; the best is kept), both with triton's do_bench (median, L2 flushed before every run).
It measures the card's read bandwidth in the same run and reports SparQ's floor (the bytes SparQ
must read: r columns of K per position, k rows of K and V, the V sum / measured bandwidth).
Returns the rows and writes them as JSON under out_dir.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path

import torch

from ..config import SparQConfig

# (label, B, Hq, Hkv, S, d, dtype)
DEFAULT_SHAPES = [
    ("MHA", 1, 32, 32, 4096, 128, torch.float16),
    ("MHA", 1, 32, 32, 16384, 128, torch.float16),
    ("MHA", 1, 32, 32, 65536, 128, torch.float16),
    ("MHA", 8, 32, 32, 16384, 128, torch.float16),
    ("MHA", 8, 32, 32, 65536, 128, torch.float16),
    ("MHA", 32, 32, 32, 16384, 128, torch.float16),
    ("MHA", 64, 32, 32, 4096, 128, torch.float16),
    ("GQA", 1, 32, 8, 32768, 128, torch.bfloat16),
    ("GQA", 8, 32, 8, 32768, 128, torch.bfloat16),
    ("GQA", 16, 32, 8, 65536, 128, torch.bfloat16),
]

# Long contexts with large budgets (Llama-3-8B attention shape at batch 1): the 8th entry is the
# k divisor of that shape (k = S / k_div), overriding bench_kernels' k_div.
LONG_SHAPES = [
    ("GQA", 1, 32, 8, 131072, 128, torch.bfloat16, 16),
    ("GQA", 1, 32, 8, 131072, 128, torch.bfloat16, 8),
    ("GQA", 1, 32, 8, 131072, 128, torch.bfloat16, 4),
    ("MHA", 1, 32, 32, 131072, 128, torch.float16, 4),
]


def _graphed(fn):
    """Capture fn() in a CUDA graph (after warm-up on a side stream); return replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def measure_read_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large read-mostly reduction (best of sum and amax over an fp16 buffer)."""
    from triton.testing import do_bench

    x = torch.randn(nbytes // 2, device="cuda", dtype=torch.float16)
    best = math.inf
    for fn in (lambda: x.sum(dtype=torch.float32), lambda: x.amax()):
        best = min(best, do_bench(fn, warmup=25, rep=200, return_mode="median"))
    del x
    torch.cuda.empty_cache()
    return nbytes / (best * 1e-3)


def _dense_candidates(q, k, v, enable_gqa):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q4 = q.unsqueeze(2)
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=enable_gqa)
        try:
            fn()
            torch.cuda.synchronize()
            out[name] = fn
        except Exception:  # backend does not support this shape/dtype/GQA here
            torch.cuda.synchronize()
    return out


def sparq_bytes(batch, num_kv_heads, seq, head_dim, elt, cfg: SparQConfig) -> int:
    """Bytes SparQ must read per step: r columns of K^T, k rows of K and V, the fp32 V sum."""
    r = min(cfg.r, head_dim)
    k = cfg.k_for(seq)
    per_head = seq * r * elt + 2 * k * head_dim * elt + 4 * head_dim
    return batch * num_kv_heads * per_head


def random_cache(batch: int, hq: int, hkv: int, seq: int, d: int, dtype: torch.dtype):
    """A full `KernelCacheLayer` of random K/V (written straight into the buffers, no second copy
    in memory) and a random query [B, Hq, d], on the current CUDA device."""
    from ..caches.static import KernelCacheLayer

    cache = KernelCacheLayer(batch, hkv, d, seq, dtype, "cuda")
    cache.key.normal_()
    cache.value.normal_()
    cache.key_t.copy_(cache.key.transpose(-1, -2))
    cache.value_sum.copy_(cache.value.float().sum(2))
    cache.lengths.fill_(seq)
    return cache, torch.randn(batch, hq, d, device="cuda", dtype=dtype)


def bench_kernels(shapes=None, *, r_div: int = 8, k_div: int = 16, local_fraction: float = 0.25,
                  reallocate: bool = True, out_dir: str | os.PathLike | None = "benchmarks/results",
                  warmup_ms: int = 25, rep_ms: int = 200, print_table: bool = True, tag: str = "") -> dict:
    """Benchmark the SparQ kernels against dense SDPA on the current CUDA device.

    shapes: list of (label, B, Hq, Hkv, S, d, dtype[, k_div]) (default: DEFAULT_SHAPES); config per
    shape r = d / r_div, k = S / k_div (a shape's own k_div wins) (k_fraction = 1/k_div), local window local_fraction * k.
    Returns {"device", "versions", "read_bandwidth_TBps", "rows": [...], "path"}; writes the same
    dict as JSON to out_dir/kernels-<device>-<UTC time>.json unless out_dir is None.
    """
    import triton
    from triton.testing import do_bench

    from ..kernels.dispatch import DecodePlan

    if not torch.cuda.is_available():
        raise RuntimeError("bench_kernels needs a CUDA device")
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    bw = measure_read_bandwidth()
    rows = []
    for shape in shapes:
        label, batch, hq, hkv, seq, d, dtype = shape[:7]
        kd = shape[7] if len(shape) > 7 else k_div
        cfg = SparQConfig(r=max(1, d // r_div), k=max(1, seq // kd), local_window=0,
                          reallocate=reallocate, k_fraction=1.0 / kd, local_fraction=local_fraction)
        torch.manual_seed(0)
        cache, q = random_cache(batch, hq, hkv, seq, d, dtype)
        out = torch.empty_like(q)
        plan = DecodePlan(batch, hq, hkv, d, seq, cfg, q.device, dtype)  # planned once, as a cache would

        def sparq_step():
            plan.run(q, cache.key, cache.value, cache.lengths, key_t=cache.key_t, value_sum=cache.value_sum, out=out)

        sparq_ms = do_bench(_graphed(sparq_step), warmup=warmup_ms, rep=rep_ms, return_mode="median")
        dense = {}
        for name, fn in _dense_candidates(q, cache.key, cache.value, hq != hkv).items():
            try:
                dense[name] = do_bench(_graphed(fn), warmup=warmup_ms, rep=rep_ms, return_mode="median")
            except Exception:
                torch.cuda.synchronize()
        best_name = min(dense, key=dense.get) if dense else None
        elt = torch.finfo(dtype).bits // 8
        need = sparq_bytes(batch, hkv, seq, d, elt, cfg)
        dense_need = 2 * batch * hkv * seq * d * elt
        sparq_floor_us = need / bw * 1e6
        row = {
            "label": label, "B": batch, "Hq": hq, "Hkv": hkv, "S": seq, "d": d, "dtype": str(dtype).split(".")[-1],
            "r": cfg.r, "k_div": kd, "k": cfg.k_for(seq), "local": cfg.local_for(seq), "reallocate": reallocate,
            "sparq_us": sparq_ms * 1e3,
            "dense_us": {k_: v_ * 1e3 for k_, v_ in dense.items()},
            "best_dense": best_name,
            "best_dense_us": dense[best_name] * 1e3 if best_name else None,
            "dense_floor_us": dense_need / bw * 1e6,
            "sparq_bytes": need,
            "sparq_floor_us": sparq_floor_us,
            "speedup": (dense[best_name] / sparq_ms) if best_name else None,
            "fraction_of_floor": sparq_floor_us / (sparq_ms * 1e3),
            "sparq_read_TBps": need / (sparq_ms * 1e-3) / 1e12,
        }
        rows.append(row)
        del cache, q, out, plan
        torch.cuda.empty_cache()
        if print_table:
            print(format_row(row), flush=True)
    props = torch.cuda.get_device_properties(0)
    result = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "read_bandwidth_TBps": bw / 1e12,
        "timing": "triton.testing.do_bench median, L2 flushed before each run, CUDA-graph replays",
        "config": {"r": f"d/{r_div}", "k": f"S/{k_div}", "local_fraction": local_fraction, "reallocate": reallocate},
        "rows": rows,
        "tag": tag,
    }
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dev = props.name.replace(" ", "_").replace("/", "_")
        file = path / f"kernels-{dev}{tag}-{stamp}.json"
        file.write_text(json.dumps(result, indent=1))
        result["path"] = str(file)
    if print_table:
        print(format_table(result))
    return result


def format_row(row) -> str:
    sp = f"{row['speedup']:.2f}x" if row["speedup"] else "n/a"
    return (f"{row['label']:3s} B={row['B']:<3d} S={row['S']:<6d} k=S/{row.get('k_div', 16):<2d} {row['dtype']:8s} "
            f"sparq {row['sparq_us']:8.1f} us  dense({row['best_dense']}) {row['best_dense_us'] or float('nan'):8.1f} us  "
            f"speedup {sp:>6s}  floor {row['sparq_floor_us']:7.1f} us ({100 * row['fraction_of_floor']:.0f}%)")


def format_table(result) -> str:
    lines = [f"device {result['device']}  torch {result['versions']['torch']}  triton {result['versions']['triton']}  "
             f"read bandwidth {result['read_bandwidth_TBps']:.2f} TB/s",
             "| shape | B | S | k | dtype | SparQ us | best dense us (backend) | speed-up | SparQ floor us | of floor | SparQ TB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} {r['Hq']}/{r['Hkv']} d={r['d']} | {r['B']} | {r['S']} | S/{r.get('k_div', 16)} | {r['dtype']} | {r['sparq_us']:.1f} | "
            f"{r['best_dense_us']:.1f} ({r['best_dense']}) | {r['speedup']:.2f}x | {r['sparq_floor_us']:.1f} | "
            f"{100 * r['fraction_of_floor']:.0f}% | {r['sparq_read_TBps']:.2f} |")
    return "\n".join(lines)
