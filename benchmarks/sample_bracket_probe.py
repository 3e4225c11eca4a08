"""How well the selection's sample brackets the threshold on a real model's keys (CPU, no kernels).

The kernels' selection (kernels/select.py) draws a sample of each KV head's selection keys, takes two
order statistics of it as a bracket [U_lo, U_hi] around the need-th largest key, and resolves exactly
inside the bracket; a bracket that misses (too many keys above U_hi, or too few up to U_lo) sends the
head to an exact but much slower fallback, and one wider than the resolve's registers (CAP) to the
in-memory path. Random test caches have no structure; real prompts do (a passkey haystack is one
sentence repeated), and a systematic sample with a power-of-two stride could alias with it.

This probe runs a model over passkey prompts with the default method's selection keys captured at the
first decode step (every layer and KV head: s_hat summed over the group, the kernels' key up to a
monotone map), then replays the sample kernel's bracket on them for three samples of equal size:
  stride: every p-th candidate (p a power of two; what the kernels draw since 2026-11-30),
  spread: positions floor(i * n_cand / ns) (what they drew before),
  jitter: one uniformly random position in each stride-p stratum.
It prints, per prompt length and sample, how often the bracket missed or outgrew CAP, and the mean
bracket size against `select.predicted_bracket`'s mean. Writes sample-bracket-<model>-<UTC>.json.

Usage: PYTHONPATH=src python benchmarks/sample_bracket_probe.py [MODEL] [LENGTHS] [ITEMS] [SAMPLES]
       (defaults: smollm2 2000,4000,8000 2, the plan's sample tile; a smaller SAMPLES forces the
       larger strides that long contexts get, e.g. 256 at 8k tokens: stride 32)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch


def order_keys(v: np.ndarray) -> np.ndarray:
    """fp32 -> int64 in [0, 2^32), order preserving (select._order_key)."""
    bits = v.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, (~bits) & 0xFFFFFFFF, bits + 2147483648)


def bracket(u: np.ndarray, need: int, pos: np.ndarray, tol: int) -> tuple[int, int]:
    """(U_lo, U_hi) as `_sample_kernel` finds them from the sampled keys u[pos] (the tolerance widens
    each end by at most tol order-key steps: counted as the full tol here)."""
    n_cand, ns = len(u), len(pos)
    su = np.sort(u[pos])[::-1]
    t = need * ns / n_cand
    margin = 0.0 if ns == n_cand else 4.0 * math.sqrt(max(t * (1.0 - t / ns), 0.0)) + 2.0
    r_hi = math.floor(t - margin) - 1
    r_lo = math.ceil(t + margin) - 1
    w = 0 if ns == n_cand else tol
    u_hi = (1 << 32) if r_hi < 0 else int(su[max(r_hi, 0)]) + w
    u_lo = 0 if r_lo >= ns else int(su[min(r_lo, ns - 1)]) - w
    return u_lo, u_hi


def main() -> None:
    from sparq import hf
    from sparq.kernels import select
    from sparq.kernels.sketch_scores import SketchConfig
    from sparq.methods import Dense, DecodeMethod, default_method
    from sparq.methods._common import lengths_of
    from sparq.models import load
    from sparq.tools.eval.tasks import TaskSizes, passkey_items

    model_name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    lengths = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "2000,4000,8000").split(",")]
    n_items = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    forced = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load(model_name)
    cfg = model.config.get_text_config(decoder=True)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    method = default_method(1 / 8, d)
    sk = SketchConfig.from_method(method, d)
    captured: list[np.ndarray] = []

    @dataclasses.dataclass(frozen=True)
    class Capture(DecodeMethod):
        name = "capture"

        def attend(self, x):
            if x.query.shape[0] == 1 and int(lengths_of(x.valid)[0]) > 1:
                n = int(lengths_of(x.valid)[0])
                keys = method.approx_scores(x).sum(2)[0, :, :n]  # [Hkv, n]: the selection keys
                captured.extend(keys.float().numpy())
            return Dense().attend(x)

        def data_fraction(self, length, head_dim):
            return 1.0

    hf.enable(model, Capture())
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        items = passkey_items(tok, TaskSizes(lengths=(length,), depths=(0.5,), items=n_items), 0)
        captured.clear()
        for it in items:
            ids = torch.tensor([it.prompt_ids])
            with torch.inference_mode():
                from sparq.caches.dynamic import SparQCache

                cache = SparQCache(config=model.config)
                out = model(input_ids=ids, **{hf.cache_arg(model): cache}, use_cache=True, logits_to_keep=1)
                model(input_ids=out.logits[:, -1].argmax(-1)[:, None], **{hf.cache_arg(model): cache}, use_cache=True)
        n = len(items[0].prompt_ids) + 1
        sizes = select.selection_sizes(n, sk)
        if forced:
            sizes = select.sample_sizes(n, forced, sizes.cap, sizes.tol)
        k, lb = sk.k_for(n), sk.local_for(n)
        n_cand, need = n - lb, k - lb
        stride = sizes.stride
        ns = -(-n_cand // stride)
        pred = select.predicted_bracket(n, sk, stride)
        stats = {s: {"miss": 0, "over_cap": 0, "bracket": []} for s in ("stride", "spread", "jitter")}
        for keys in captured:
            u = order_keys(keys[:n_cand])
            for s in stats:
                if s == "stride":
                    pos = np.arange(0, n_cand, stride)
                elif s == "spread":
                    pos = (np.arange(ns) * n_cand) // ns
                else:
                    pos = np.minimum(np.arange(0, n_cand, stride) + rng.integers(0, stride, ns), n_cand - 1)
                u_lo, u_hi = bracket(u, need, pos, sizes.tol)
                above = int((u > u_hi).sum())
                inside = int(((u >= u_lo) & (u <= u_hi)).sum())
                miss = above > need or above + inside < need
                stats[s]["miss"] += int(miss)
                stats[s]["over_cap"] += int(not miss and inside > sizes.cap)
                stats[s]["bracket"].append(inside)
        row = {"length": n, "heads": len(captured), "k": k, "need": need, "stride": stride, "samples": ns,
               "cap": sizes.cap, "predicted_bracket_mean": round(pred[0], 1),
               "schemes": {s: {"miss": v["miss"], "over_cap": v["over_cap"],
                               "bracket_mean": round(float(np.mean(v["bracket"])), 1),
                               "bracket_max": int(np.max(v["bracket"]))} for s, v in stats.items()}}
        rows.append(row)
        print(f"{model_name} n={n} heads={len(captured)} k={k} stride={stride} samples={ns} cap={sizes.cap} "
              f"predicted bracket {pred[0]:.0f} +- {pred[1]:.0f}")
        for s, v in row["schemes"].items():
            print(f"   {s:6s}: missed {v['miss']}/{len(captured)}, over CAP {v['over_cap']}, "
                  f"bracket mean {v['bracket_mean']} max {v['bracket_max']}")
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"sample-bracket-{model_name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump({"model": model_name, "method": "default (sparq-sketch 1/8, 2 bits)", "task": "passkey, depth 0.5",
                   "samples_forced": forced or None,
                   "keys": "s_hat summed over the group at the first decode step, every layer and KV head",
                   "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
