"""CPU decode ms/step through transformers' cache (`SparQCache`, the PyTorch path: no Triton).

One dense prefill of a ~`--context`-token prompt (real text) into a SparQCache; each method then
decodes from its own deep copy of that cache, the methods taking turns step by step (round-robin,
so the load of a shared machine falls on all of them alike). The first step of each method
(which derives its state from the prefilled K/V) is reported apart; then the median and mean ms
of the `--steps` later steps. The method `sparq-sketch-rebuild` is `sparq-sketch` with no kept
sketch (its `sketch_spec` is None, so the cache keeps none and `attend` rebuilds `key_sketch` over
every position each step): what the CPU path did before the sketch was kept in PyTorch.

    PYTHONPATH=src python benchmarks/cpu_decode.py --context 2048 --steps 24 --threads 1 \
        --methods dense,sparq-sketch-rebuild,sparq-sketch,sparq --out benchmarks/results/cpu-decode-smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _rebuild_class():
    from dataclasses import dataclass

    from sparq.methods import SparQSketch

    @dataclass(frozen=True)
    class Rebuild(SparQSketch):
        """sparq-sketch with no kept sketch: key_sketch over every position at every step."""

        @property
        def sketch_spec(self):  # type: ignore[override]
            return None

    return Rebuild


def main() -> None:
    global _Rebuild
    _Rebuild = _rebuild_class()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", default="1/8")
    ap.add_argument("--methods", default="dense,sparq-sketch-rebuild,sparq-sketch,sparq")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sparq import hf
    from sparq.caches.dynamic import SparQCache
    from sparq.methods import Dense, build_method
    from sparq.models import load
    from sparq.tools.eval.tasks import load_text

    model, tok = load(args.model)
    ids = tok(load_text(None), return_tensors="pt").input_ids[:, : args.context].repeat(args.batch, 1)
    mask = torch.ones_like(ids)
    cfg = model.config.get_text_config(decoder=True)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rows = []
    with torch.inference_mode():
        hf.enable(model, Dense())
        cache = SparQCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, **{hf.cache_arg(model): cache}, use_cache=True,
                    logits_to_keep=1)
        first = out.logits[:, -1].argmax(-1)
        specs = args.methods.split(",")
        runs = []
        for spec in specs:
            rebuild = spec.endswith("-rebuild")
            method = build_method(spec.removesuffix("-rebuild"), 1.0 if spec == "dense" else args.budget, d)
            if rebuild:
                method = _Rebuild(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})
            runs.append(dict(spec=spec, method=method, cache=copy.deepcopy(cache), mask=mask.clone(), nxt=first,
                             times=[], tokens=[]))
        for _ in range(args.steps + 1):
            for r in runs:
                hf.enable(model, r["method"])
                r["mask"] = torch.cat([r["mask"], r["mask"].new_ones(r["mask"].shape[0], 1)], -1)
                m = r["mask"]
                t0 = time.perf_counter()
                o = model(input_ids=r["nxt"][:, None], attention_mask=m, position_ids=m.sum(-1, keepdim=True) - 1,
                          **{hf.cache_arg(model): r["cache"]}, use_cache=True)
                r["nxt"] = o.logits[:, -1].argmax(-1)
                r["times"].append(time.perf_counter() - t0)
                r["tokens"].append(int(r["nxt"][0]))
        for r in runs:
            times = r["times"]
            later = [t * 1e3 for t in times[1:]]
            row = dict(method=r["spec"], label=r["method"].label, first_step_ms=round(times[0] * 1e3, 2),
                       median_ms=round(statistics.median(later), 2), mean_ms=round(statistics.mean(later), 2),
                       tokens=r["tokens"])
            rows.append(row)
            print(f"{r['spec']:>24}: first step {row['first_step_ms']:8.1f} ms, then median {row['median_ms']:7.1f} "
                  f"mean {row['mean_ms']:7.1f} ms/step", flush=True)
    hf.disable(model)
    result = dict(model=args.model, context=ids.shape[1], batch=args.batch, steps=args.steps, budget=args.budget,
                  threads=args.threads, label=args.label, torch=torch.__version__, machine=platform.processor(),
                  cpus=os.cpu_count(), when=_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                  rows=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
