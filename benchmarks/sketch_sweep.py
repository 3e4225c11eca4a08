"""GPU sweep of the sketch step's launch knobs (`dispatch.Tuning`), one knob at a time from the defaults.

For each shape (the issue's large ones by default), builds the 2-bit sketch of a random cache once,
then times the whole CUDA-graphed `sparq-sketch` step (default method: no local window, no
reallocation) for the default Tuning and for each variant. Prints a table per shape and writes
sketch-sweep-<device>-<UTC>.json to $OUT (or benchmarks/results). Usage (GPU, repository root):
  PYTHONPATH=src python benchmarks/sketch_sweep.py [--shapes MHA:8:65536,GQA:16:65536,GQA:8:32768]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sketch_bench import _bench, _kernel_profile, prefilled_sketch  # noqa: E402

VARIANTS: dict[str, dict] = {
    "default": {},
    "score_warps=2": {"score_warps": 2}, "score_warps=8": {"score_warps": 8},
    "score_bpsm=8": {"score_blocks_per_sm": 8}, "score_bpsm=16": {"score_blocks_per_sm": 16},
    "score_bpsm=64": {"score_blocks_per_sm": 64},
    "score_stages=1": {"score_stages": 1}, "score_stages=3": {"score_stages": 3}, "score_stages=4": {"score_stages": 4},
    "emit_bpsm=8": {"emit_blocks_per_sm": 8}, "emit_bpsm=32": {"emit_blocks_per_sm": 32},
    "emit_block=2048": {"emit_block": 2048}, "emit_block=512": {"emit_block": 512}, "emit_warps=8": {"emit_warps": 8},
    "select_warps=8": {"select_warps": 8}, "select_warps=32": {"select_warps": 32},
    "pivots=1": {"search_pivots": 1}, "pivots=8": {"search_pivots": 8},
    "gather_bpsm=16": {"gather_blocks_per_sm": 16}, "gather_bpsm=64": {"gather_blocks_per_sm": 64},
    "compact_tiles=1": {"compact_tiles": 1}, "compact_tiles=2": {"compact_tiles": 2},
    "emit512+stages1": {"emit_block": 512, "score_stages": 1},
    "gather_warps=8": {"gather_warps": 8}, "gather_block=32": {"gather_block": 32},
    # atomic-order index lists: no keep bitmap, no compaction, no per-winner atomics in the resolve
    "det=0": {"deterministic": False},
    # the selection's sample read in place (a sector per key) instead of step 1's compact copy;
    # the resolve recomputing candidate keys from the logits instead of reading the emit's
    "sample_copy=0": {"sample_copy": False}, "candidate_keys=0": {"candidate_keys": False},
    "neither": {"sample_copy": False, "candidate_keys": False},
    # register caps (the default since 2026-11-30 is the plan's: dispatch.Tuning); 0 = no cap
    "emit_maxnreg=64": {"emit_maxnreg": 64}, "emit_maxnreg=56": {"emit_maxnreg": 56},
    "sketch_maxnreg=72": {"sketch_maxnreg": 72}, "sketch_maxnreg=64": {"sketch_maxnreg": 64},
    "maxnreg=72/64": {"sketch_maxnreg": 72, "emit_maxnreg": 64},
    "maxnreg=0": {"sketch_maxnreg": 0, "emit_maxnreg": 0},
    "emit_block=512+maxnreg=64": {"emit_block": 512, "emit_maxnreg": 64},
    # sample tile / resolve capacity pairs (the plan's choice comes from select.selection_sizes)
    # plain launches / programmatic dependent ones (kernels/pdl.py; off by default since 2026-12-01)
    "pdl=0": {"pdl": False}, "pdl=1": {"pdl": True},
    # the resolve's register tile always CAP keys instead of the smallest of CAP / 8, CAP / 2, CAP that fits
    "fit=0": {"resolve_fit_tile": False},
    "select_warps=4": {"select_warps": 4}, "pivots=16": {"search_pivots": 16, "search_budget": None},
    "s2k-c4k": {"samples": 2048, "select_cap": 4096}, "s4k-c4k": {"samples": 4096, "select_cap": 4096},
    "s2k-c8k": {"samples": 2048, "select_cap": 8192}, "s4k-c8k": {"samples": 4096, "select_cap": 8192},
}


def main() -> None:
    import triton

    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan
    from sparq.kernels.sketch_scores import SketchConfig
    from sparq.methods.sketch import SparQSketch
    from sparq.tools.bench_kernels import random_cache

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="MHA:8:65536,GQA:16:65536,GQA:8:32768,GQA:1:32768")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="also each kernel's time per variant (torch.profiler)")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0)
    rows = []
    for spec in args.shapes.split(","):
        kind, batch, seq = spec.split(":")
        batch, seq = int(batch), int(seq)
        hq, hkv, dtype = (32, 32, torch.float16) if kind == "MHA" else (32, 8, torch.bfloat16)
        d, bits, block = 128, 2, 128
        cache, q = random_cache(batch, hq, hkv, seq, d, dtype)
        cache.derived.key_t_buf = None
        out = torch.empty_like(q)
        st = prefilled_sketch(cache, bits, block)
        m = SparQSketch(0.125, bits=bits, block=block, local_fraction=0.0, reallocate=False)
        cfg = SketchConfig.from_method(m, d)
        row = {"shape": kind, "B": batch, "S": seq, "Hq": hq, "Hkv": hkv, "d": d, "dtype": str(dtype), "us": {}}
        for name in args.variants.split(","):
            plan = None
            try:
                plan = DecodePlan(batch, hq, hkv, d, seq, cfg, q.device, dtype, tuning=DEFAULT_TUNING.with_(**VARIANTS[name]))
                step = (lambda plan=plan, c=cache: plan.run(q, c.key, c.value, c.lengths, value_sum=c.value_sum,
                                                              out=out, sketch=st))
                row["us"][name] = round(_bench(step), 1)
                if args.profile:
                    row.setdefault("kernels_us", {})[name] = {k.split("(")[0]: v for k, v in _kernel_profile(step).items()}
            except Exception as e:  # a variant the kernels cannot launch (registers, shared memory)
                row["us"][name] = None
                row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:120]}"
            plan = None
        base = row["us"]["default"]
        print(f"{kind} B{batch} S{seq}: default {base} us | " + ", ".join(
            f"{k} {v} ({100 * (v / base - 1):+.0f}%)" for k, v in row["us"].items() if k != "default" and v), flush=True)
        for name, ks in row.get("kernels_us", {}).items():
            print(f"   {name}: " + ", ".join(f"{k.strip('_').replace('_kernel', '')} {v}" for k, v in ks.items()))
        rows.append(row)
        del cache, q, st
        torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"sketch-sweep-{device.replace(' ', '_')}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                   "method": "sparq-sketch 1/8, 2 bits, block 128, no local window, no reallocation",
                   "timing": "do_bench median of the CUDA-graphed step, us", "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
