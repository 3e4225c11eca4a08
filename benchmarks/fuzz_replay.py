"""Replay one case configuration of a `gpu_fuzz.py` report on fresh random inputs, to tell a one-off from
a systematic failure (and to check a fix on the same configuration).

Usage (GPU machine, repository root):
  PYTHONPATH=src FUZZ_METHOD=sketch python benchmarks/fuzz_replay.py REPORT.json [--problem 0] [--seeds 150]
      [--set dtype=float16 --set appends=0 ...]
Prints each failing seed and a summary line: cases, failing (rows outside the tolerance or near ties).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_fuzz  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", help="a gpu_fuzz.py JSON report")
    ap.add_argument("--problem", type=int, default=0, help="which entry of the report's problems")
    ap.add_argument("--seeds", type=int, default=150)
    ap.add_argument("--set", action="append", default=[], help="override a case field: name=value (JSON value)")
    args = ap.parse_args()
    case = dict(json.load(open(args.report))["problems"][args.problem]["case"])
    for item in args.set:
        name, value = item.split("=", 1)
        try:
            case[name] = json.loads(value)
        except json.JSONDecodeError:
            case[name] = value
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = gpu_fuzz.run_sketch_case if gpu_fuzz.METHOD == "sketch" else gpu_fuzz.run_case
    failing = 0
    t0 = time.time()
    for seed in range(args.seeds):
        gen = torch.Generator(device=device).manual_seed(seed)
        res = run(case, device, gen)
        if res["bad_rows"]:
            failing += 1
            print(f"seed {seed}: rows {res['rows']}, failures {res['failures']}, near ties {res['near_ties']}, "
                  f"max err {res['max_err']:.3g}", flush=True)
    print(f"{json.dumps(case)}: cases {args.seeds}, failing {failing}, {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
