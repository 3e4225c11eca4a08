"""Prefill attention inside a continuous batch: one SDPA over the whole packed batch under a [Q, K]
block-diagonal causal mask (transformers' "paged|sdpa", and `serving` until 2026-12-01; kept below
as `packed_attention`) against each prefill request attending over its own keys only
(`serving._own_keys_attention`).

A serving pass with a prefill chunk packs the chunk's tokens beside one token per decode request,
and `cache.update` returns every request's whole keys packed back to back (K = the sum of all
contexts). The packed-mask SDPA computes Q x K scores, most of them masked (the decode requests'
keys), and builds a Q x K mask first. Per request, a chunk of n_q new tokens over n_k keys needs
n_q x n_k, lower-right causal (its new tokens are the last n_q of its keys).

Prints a table and writes JSON under benchmarks/results/ (device, versions, shapes, medians, and
the largest difference between the variants' outputs on the prefill rows). The JSON of 06:31 on
2026-12-01 also has the decode rows attended per request (`per_request_with_decodes_ms`), a variant
that `serving` tried for dense decode and dropped. Run on the GPU:
    PYTHONPATH=src python benchmarks/prefill_attention.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import repeat_kv


# transformers' "paged|sdpa" over a packed batch (what `serving` ran for prefill chunks before
# 2026-12-01): one SDPA under a [Q, K] block-diagonal causal mask.
def packed_causal_mask(bq: list[int], bk: list[int], q_len: int, k_len: int, dtype: torch.dtype,
                       device: torch.device) -> Tensor:
    """[1, 1, Q, K] additive mask of a packed batch, as CB's `build_attention_mask` makes it for
    "paged|sdpa": query token i of request r sees key j of r when j's position <= i's position
    (the request's new tokens are the last ones of its keys). Padding tokens (beyond the last
    request) see nothing and get a uniform row, as in transformers."""
    n_req = len(bq) - 1
    len_q = torch.tensor([bq[i + 1] - bq[i] for i in range(n_req)], device=device)
    len_k = torch.tensor([bk[i + 1] - bk[i] for i in range(n_req)], device=device)
    ids = torch.arange(n_req, device=device)
    req_q = torch.full((q_len,), -1, dtype=torch.long, device=device)
    req_k = torch.full((k_len,), -2, dtype=torch.long, device=device)
    req_q[: bq[-1]] = torch.repeat_interleave(ids, len_q)
    req_k[: bk[-1]] = torch.repeat_interleave(ids, len_k)
    start_q = torch.tensor(bq[:-1], device=device)
    start_k = torch.tensor(bk[:-1], device=device)
    # position of each token within its request's keys (queries are the last len_q of them)
    pos_q = torch.zeros(q_len, dtype=torch.long, device=device)
    pos_k = torch.zeros(k_len, dtype=torch.long, device=device)
    iq = torch.arange(bq[-1], device=device)
    ik = torch.arange(bk[-1], device=device)
    rq, rk = req_q[: bq[-1]], req_k[: bk[-1]]
    pos_q[: bq[-1]] = iq - start_q[rq] + (len_k - len_q)[rq]
    pos_k[: bk[-1]] = ik - start_k[rk]
    allowed = (req_q[:, None] == req_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
    mask = torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor, dropout: float,
                     scaling: float | None) -> Tensor:
    """transformers' "paged|sdpa" on the packed batch: query [1, Hq, Q, d]; key, value [K, Hkv, d].
    Returns [1, Q, Hq, d]."""
    k = key.transpose(0, 1).unsqueeze(0)
    v = value.transpose(0, 1).unsqueeze(0)
    groups = getattr(module, "num_key_value_groups", 1)
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask, dropout_p=dropout, scale=scaling,
        is_causal=False)
    return out.transpose(1, 2).contiguous()


# (name, [(new tokens, keys) per request]): a decode request is (1, n); Llama-3-8B heads.
SCENARIOS = [
    ("first chunk of a 16k prompt + 8 decodes of 12k", [(8184, 8184)] + [(1, 12288)] * 8),
    ("last chunk of a 16k prompt + 8 decodes of 12k", [(8184, 16384)] + [(1, 12288)] * 8),
    ("two chunks (end 8k of 12k, start 4k) + 8 decodes of 12k",
     [(4088, 12288), (4096, 4096)] + [(1, 12288)] * 8),
    ("first chunk of an 8k prompt alone", [(8192, 8192)]),
    ("last 7 tokens of a prompt + 8 decodes of 16k", [(7, 8192)] + [(1, 16384)] * 8),
]


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args()
    import transformers

    from sparq import serving
    from sparq.tools.bench_generate import markdown_table, write_json

    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d = a.heads, a.kv_heads, a.head_dim
    module = torch.nn.Module()
    module.num_key_value_groups = hq // hkv
    rows = []
    for name, reqs in SCENARIOS:
        bq, bk = [0], [0]
        for n_q, n_k in reqs:
            bq.append(bq[-1] + n_q)
            bk.append(bk[-1] + n_k)
        q_len, k_len = bq[-1], bk[-1]
        g = torch.Generator(device=dev).manual_seed(0)
        query = torch.randn(1, hq, q_len, d, device=dev, dtype=dt, generator=g)
        key = torch.randn(k_len, hkv, d, device=dev, dtype=dt, generator=g)
        value = torch.randn(k_len, hkv, d, device=dev, dtype=dt, generator=g)
        cu_q = torch.tensor(bq, dtype=torch.int32, device=dev)
        cu_k = torch.tensor(bk, dtype=torch.int32, device=dev)
        serving._LAST_PLAN.clear()
        plan = serving._plan(cu_q, cu_k, k_len, dev)
        mask = packed_causal_mask(bq, bk, q_len, k_len, dt, dev)
        prefill_rows = torch.cat([torch.arange(bq[r], bq[r + 1], device=dev)
                                  for r in range(len(reqs)) if reqs[r][0] > 1])

        def packed_sdpa_only() -> torch.Tensor:
            return packed_attention(module, query, key, value, mask, 0.0, None)

        def per_request() -> torch.Tensor:
            return serving._own_keys_attention(module, query, key, value, plan, 0.0, None)

        ref = packed_sdpa_only()[0].float()
        diff = (ref[prefill_rows] - per_request()[0, prefill_rows].float()).abs().max().item()
        mask_ms = _time(lambda: packed_causal_mask(bq, bk, q_len, k_len, dt, dev), a.reps)
        row = {"scenario": name, "requests": [list(r) for r in reqs], "Q": q_len, "K": k_len,
               "packed_mask_build_ms": mask_ms, "packed_sdpa_ms": _time(packed_sdpa_only, a.reps),
               "per_request_ms": _time(per_request, a.reps),
               "max_abs_diff_prefill_rows": diff}
        row["speedup_per_layer"] = (row["packed_sdpa_ms"]) / row["per_request_ms"]
        rows.append(row)
        print(row, flush=True)
        del query, key, value, plan, mask
        serving._LAST_PLAN.clear()
        torch.cuda.empty_cache()
    cols = ["scenario", "Q", "K", "packed_mask_build_ms", "packed_sdpa_ms", "per_request_ms", "speedup_per_layer",
            "max_abs_diff_prefill_rows"]
    print(markdown_table("prefill attention, one layer (ms)", cols,
                         [[r[c] if not isinstance(r[c], float) else f"{r[c]:.3g}" for c in cols] for r in rows]))
    out = {"device": torch.cuda.get_device_name(), "host": platform.node(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "shapes": {"heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": "bfloat16"},
           "timing": f"CUDA events, median of {a.reps} after one warm-up; one layer's attention; the mask is "
                     f"built once per pass (all layers share it), the SDPA runs once per layer",
           "rows": rows}
    write_json(out, a.out_dir, "prefill-attention")
    print(out["path"])


if __name__ == "__main__":
    main()
