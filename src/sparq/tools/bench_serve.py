"""Serving benchmark: transformers' continuous batching, dense ("paged|sdpa") against SparQ
("paged|sparq", `sparq.serving`), same model, same requests, same paged-cache size, same run.

N requests with prompt lengths spread evenly over [min_prompt, max_prompt] (shuffled with a fixed
seed) are submitted at once to `model.generate_batch`, each asking for `new_tokens` tokens (greedy,
no EOS). Per variant it reports
  * throughput: generated tokens over the wall time of the whole `generate_batch` call (prefill
    included: what a server delivers), after a short warm-up call of the same variant;
  * time per output token (TPOT) per request: (last token's time - first token's time) / (n - 1)
    from transformers' per-token timestamps; median and p95 over the requests; time to first
    token the same way (first token's time - the request's creation time);
  * the largest number of requests in flight at once: requests whose lifespans (scheduled ->
    finished, transformers' `GenerationOutput.lifespan`) overlap, i.e. that held cache blocks
    together;
  * peak device memory (CUDA) over the call;
  * per kind of forward pass (decode-only, or with a prefill chunk): how many ran and their median
    duration (`PassClock`: host clock, shapes only, no device read), i.e. which kind the wall time
    went to.
Both variants get the same `ContinuousBatchingConfig`: block size, number of blocks (from
`cache_gib`, so the same memory budget: a variant that keeps a sketch beside the cache gets fewer
blocks, by the sketch's bytes) and tokens per step; no CUDA graphs and no compile (the
defaults for both implementations; "paged|sparq" cannot be captured). The JSON goes to out_dir.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..fast import kv_bytes_per_token
from .bench_generate import _free, build_model, markdown_table, write_json


DENSE_PER_REQUEST = "dense-per-request"  # the Dense method through "paged|sparq" (see _bench_serve)


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [round(lo + (hi - lo) * i / max(1, n - 1)) for i in range(n)]
    order = torch.randperm(n, generator=g).tolist()  # mixed lengths arrive interleaved, not sorted
    return [torch.randint(1, vocab, (lengths[i],), generator=g).tolist() for i in order]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def max_in_flight(spans: list[tuple[float, float]]) -> int:
    """The largest number of [start, end] intervals that overlap at one time."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    best = cur = 0
    for _, step in events:
        cur += step
        best = max(best, cur)
    return best


def pass_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    """(tokens, requests) of a continuous-batching forward pass, from the model's inputs (shapes only,
    no device read); requests is -1 outside continuous batching (no `cu_seq_lens_q`)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = ids.shape[-1] if ids is not None else kwargs["inputs_embeds"].shape[1]
    cu_q = kwargs.get("cu_seq_lens_q")
    if isinstance(cu_q, dict):
        cu_q = next(iter(cu_q.values()))
    return tokens, (cu_q.shape[0] - 1 if cu_q is not None else -1)


class PassClock:
    """When each forward pass of the model starts (host clock) and whether it was decode-only, told from
    shapes alone -- no device read: a pass is decode-only when its token count equals its request
    count (every request brings one token; continuous batching pads a batch only under CUDA graphs,
    which these runs do not use). A pass lasts until the next one starts (continuous batching reads
    each step's tokens back to the host, so the starts are paced by the device); the last pass, which
    has no next start (the call's end also holds the manager's shutdown), is not counted."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.starts: list[float] = []
        self.decode_only: list[bool] = []
        self._hook = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        tokens, requests = pass_shape(args, kwargs)
        self.starts.append(time.perf_counter())
        self.decode_only.append(tokens == requests)

    def close(self) -> None:
        self._hook.remove()

    def summary(self) -> dict:
        """Per kind of pass ("decode_only", "with_prefill"): count, median milliseconds, total seconds."""
        ms = [(b - a) * 1e3 for a, b in zip(self.starts, self.starts[1:])]
        out = {}
        for kind, want in (("decode_only", True), ("with_prefill", False)):
            sel = [m for m, d in zip(ms, self.decode_only) if d == want]
            out[kind] = {"passes": len(sel), "median_ms": statistics.median(sel) if sel else float("nan"),
                         "total_s": sum(sel) / 1e3}
        return out


def sketch_bytes_per_token(config: Any, method: Any, dtype: torch.dtype) -> int:
    """Bytes per token of the sketch kept beside the paged cache for `method` (0 without one)."""
    spec = getattr(method, "sketch_spec", None)
    if spec is None:
        return 0
    size = torch.finfo(dtype).bits // 8
    return kv_bytes_per_token(config, sketch=spec, dtype_bytes=size) - kv_bytes_per_token(config, dtype_bytes=size)


def bench_serve(model: str = "llama3-8b", requests: int = 64, min_prompt: int = 8192, max_prompt: int = 32768,
                new_tokens: int = 256, methods: tuple[str, ...] = ("dense", "default", "sparq"), budget: str = "1/8",
                *, cache_gib: float = 40.0, block_size: int = 256, max_batch_tokens: int = 8192,
                device: str | None = None, dtype: torch.dtype | None = None, seed: int = 0,
                kernels: bool | None = None, read_pages: bool | None = None, graphs: bool | None = None,
                out_dir: str | Path | None = "benchmarks/results", print_rows: bool = True) -> dict:
    """Run every variant in `methods` ("dense" = transformers' "paged|sdpa"; "dense-per-request" = dense
    attention through "paged|sparq" (each prefill request over its own keys); any other entry is a method spec for
    `build_method` at `budget`, run as "paged|sparq") over the same requests;
    returns {"device", "versions", "settings", "rows"} and writes it as JSON under out_dir.
    `kernels` / `read_pages` / `graphs` set `serving.KERNELS` / `serving.READ_PAGES` / `serving.GRAPHS` for
    this run (None: their defaults)."""
    from .. import serving

    for name, v in (("kernels", kernels), ("read_pages", read_pages), ("graphs", graphs)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name} must be True, False or None (serving.{name.upper()}'s default), got {v!r}")
    serving.check_version()
    previous = serving.KERNELS, serving.READ_PAGES, serving.GRAPHS
    if kernels is not None:  # the kernels route for the default method's decode requests, for this run only
        serving.KERNELS = kernels
    if read_pages is not None:  # decode-only batches on that route read K/V through the pages
        serving.READ_PAGES = read_pages
    if graphs is not None:  # those batches replay one CUDA graph per layer
        serving.GRAPHS = graphs
    try:
        return _bench_serve(model, requests, min_prompt, max_prompt, new_tokens, methods, budget, cache_gib=cache_gib,
                            block_size=block_size, max_batch_tokens=max_batch_tokens, device=device, dtype=dtype,
                            seed=seed, out_dir=out_dir, print_rows=print_rows)
    finally:
        serving.KERNELS, serving.READ_PAGES, serving.GRAPHS = previous


def _bench_serve(model: str, requests: int, min_prompt: int, max_prompt: int, new_tokens: int,
                 methods: tuple[str, ...], budget: str, *, cache_gib: float, block_size: int, max_batch_tokens: int,
                 device: str | None, dtype: torch.dtype | None, seed: int, out_dir: str | Path | None,
                 print_rows: bool) -> dict:
    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import sparq
    from .. import serving
    from ..methods import Dense, build_method, parse_budget

    for name, v, lo in (("requests", requests, 1), ("min_prompt", min_prompt, 1), ("new_tokens", new_tokens, 2),
                        ("block_size", block_size, 4), ("max_batch_tokens", max_batch_tokens, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(max_prompt, int) or max_prompt < min_prompt:
        raise ValueError(f"max_prompt must be an int >= min_prompt ({min_prompt}), got {max_prompt!r}")
    if not (isinstance(cache_gib, (int, float)) and cache_gib > 0):
        raise ValueError(f"cache_gib must be a positive number, got {cache_gib!r}")
    if not methods:
        raise ValueError("methods must name at least one variant")
    parse_budget(budget)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    lm = build_model(model, max_prompt + new_tokens + 1, dtype=dtype, device=str(dev))
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # checked up front; "dense-per-request" is the Dense method through "paged|sparq" (each prefill request
    # over its own keys, `serving._own_keys_attention`; decode requests batched in PyTorch)
    variants = {m: (None if m == "dense" else Dense() if m == DENSE_PER_REQUEST else build_method(m, budget, head_dim))
                for m in methods}
    per_token = kv_bytes_per_token(cfg, dtype_bytes=torch.finfo(dtype).bits // 8)
    num_blocks = int(cache_gib * 2**30) // (per_token * block_size)  # dense's; see blocks_for
    if num_blocks < 1:
        raise ValueError(f"cache_gib={cache_gib} holds no block of {block_size} tokens ({per_token} B per token)")
    prompts = _prompts(requests, min_prompt, max_prompt, cfg.vocab_size, seed)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def blocks_for(method: Any) -> tuple[int, int]:
        """(blocks, extra bytes per token): the same memory budget for every variant -- a method whose
        state lives beside the paged cache (the kept sketch, `caches.paged`) gets fewer blocks."""
        extra = sketch_bytes_per_token(cfg, method, dtype)
        return int(cache_gib * 2**30) // ((per_token + extra) * block_size), extra

    def run(inputs: list[list[int]], n_new: int, blocks: int) -> tuple[dict, float, dict]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        clock = PassClock(lm.model if hasattr(lm, "model") else lm)
        t0 = time.perf_counter()
        try:
            cb = ContinuousBatchingConfig(block_size=block_size, num_blocks=blocks, max_batch_tokens=max_batch_tokens,
                                          use_cuda_graph=False)
            out = lm.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb,
                                    record_timestamps=True, max_new_tokens=n_new)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
        finally:
            clock.close()
        return out, end - t0, clock.summary()

    rows: list[dict] = []
    dense_tokens: list[list[int]] | None = None
    for label, method in variants.items():
        ctx = sparq.enabled(lm, method, fast_loop=False) if method is not None else None
        previous = lm.config._attn_implementation
        try:
            if ctx is not None:
                ctx.__enter__()
                serving.use_paged(lm)  # explicit "paged|sparq": CB would swap in flash attention where installed
            else:
                lm.set_attn_implementation("paged|sdpa")
            blocks, extra = blocks_for(method)
            run([p[: min(len(p), 64)] for p in prompts[:2]], 2, blocks)  # warm-up: kernels, allocator, CB set-up
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            calls = dict(serving.DECODE_CALLS)
            out, wall, passes = run(prompts, new_tokens, blocks)
            calls = {k: serving.DECODE_CALLS[k] - calls[k] for k in calls}
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            else:
                lm.set_attn_implementation(previous)
        results = list(out.values())
        finished = sum(r.error is None for r in results)  # errors and requests missing from the output count as failed
        tokens = [r.generated_tokens for r in results]
        tpot = [(r.timestamps[-1] - r.timestamps[0]) / (len(r.timestamps) - 1) * 1e3
                for r in results if r.timestamps and len(r.timestamps) > 1]
        ttft = [(r.timestamps[0] - r.created_time) * 1e3 for r in results if r.timestamps]
        spans = [tuple(r.lifespan) for r in results if r.lifespan[0] >= 0 and r.lifespan[1] >= 0]
        generated = sum(len(t) for t in tokens)
        row = {
            "variant": label, "method": "dense (transformers paged sdpa)" if method is None else method.label,
            "attn_implementation": "paged|sdpa" if method is None else serving.PAGED_ATTN_NAME,
            "requests_finished": finished, "failed": len(prompts) - finished, "generated_tokens": generated,
            "wall_s": wall,
            "throughput_tokens_per_s": generated / wall,
            "tpot_ms_median": statistics.median(tpot) if tpot else float("nan"),
            "tpot_ms_p95": _percentile(tpot, 0.95),
            "ttft_ms_median": statistics.median(ttft) if ttft else float("nan"),
            "max_requests_in_flight": max_in_flight(spans), "peak_memory_GiB": peak,
            "num_blocks": blocks, "state_bytes_per_token": extra,
            # per layer and forward pass with decode requests: which route ran them (serving.DECODE_CALLS)
            "decode_calls": calls,
            # where the wall time went: forward passes with only decode tokens, and those with a prefill chunk
            "passes": passes,
        }
        if dense_tokens is None and method is None:
            dense_tokens = tokens
        elif dense_tokens is not None and len(dense_tokens) == len(tokens):
            row["requests_equal_to_dense"] = sum(a == b for a, b in zip(dense_tokens, tokens))
        rows.append(row)
        if print_rows:
            print(f"{label:<10s} {row['throughput_tokens_per_s']:10.1f} tok/s  TPOT {row['tpot_ms_median']:9.2f} ms "
                  f"(p95 {row['tpot_ms_p95']:9.2f})  in flight {row['max_requests_in_flight']:4d}  "
                  f"wall {wall:8.2f} s  decode-only pass {passes['decode_only']['median_ms']:8.2f} ms "
                  f"(x{passes['decode_only']['passes']})  prefill pass {passes['with_prefill']['median_ms']:8.2f} ms "
                  f"(x{passes['with_prefill']['passes']})" + (f"  peak {peak:6.2f} GiB" if peak is not None else ""),
                  flush=True)
        _free(dev)
    # ratios only between variants whose every request finished (a failed request generated fewer tokens)
    dense = next((r for r in rows if r["variant"] == "dense" and not r["failed"]), None)
    if dense is not None:
        for r in rows:
            if r is not dense and not r["failed"]:
                r["throughput_vs_dense"] = r["throughput_tokens_per_s"] / dense["throughput_tokens_per_s"]
                r["in_flight_vs_dense"] = (r["max_requests_in_flight"] / dense["max_requests_in_flight"]
                                           if dense["max_requests_in_flight"] else float("nan"))
    denses = [r for r in rows if r["variant"] in ("dense", DENSE_PER_REQUEST) and not r["failed"]]
    if denses:  # the faster of transformers' paged sdpa and dense through "paged|sparq", same run
        best = max(denses, key=lambda r: r["throughput_tokens_per_s"])
        for r in rows:
            if r not in denses and not r["failed"]:
                r["best_dense"] = best["variant"]
                r["throughput_vs_best_dense"] = r["throughput_tokens_per_s"] / best["throughput_tokens_per_s"]
    result = {
        "device": torch.cuda.get_device_properties(dev).name if dev.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version(), "sparq": sparq.__version__},
        "settings": {"model": model, "dtype": str(dtype).replace("torch.", ""), "requests": requests,
                     "prompt_lengths": [min_prompt, max_prompt], "new_tokens": new_tokens, "budget": budget,
                     "methods": list(methods), "cache_gib": cache_gib, "block_size": block_size,
                     "num_blocks_dense": num_blocks, "cache_tokens_dense": num_blocks * block_size,
                     "kv_bytes_per_token": per_token, "max_batch_tokens": max_batch_tokens, "seed": seed,
                     "cuda_graphs": False, "greedy": True,
                     "serving_kernels": serving.KERNELS, "serving_read_pages": serving.READ_PAGES,
                     "serving_graphs": serving.GRAPHS},
        "decode_path": "paged|sparq decode after transformers' cache.update read (a gather of every request's "
                       "K/V, as paged|sdpa): the default method (sparq-sketch, CUDA fp16/bf16) on the Triton kernels, "
                       "K/V read in place from that packed read, the sketch kept per page beside the cache "
                       "(caches.paged) and gathered packed per layer and step (serving._decode_kernels); other "
                       "methods (the paper's sparq: no Kᵀ kept) copy each decode request's K/V per step and attend "
                       "in PyTorch" + ("" if serving.KERNELS is not False else " [serving.KERNELS off: every method in "
                                                                              "PyTorch]")
                       + (" [serving.READ_PAGES on: decode-only batches on the kernels route skip transformers' "
                          "gather, the kernels read K/V through the pages]" if serving._read_pages() else "")
                       + (" [serving.GRAPHS on: those batches replay one CUDA graph per layer for the step sketch "
                          "and the kernels (serving._Graphed)]" if serving._read_pages() and serving.GRAPHS is not False
                          else ""),
        "timing": "wall clock of model.generate_batch over all requests (prefill included), after a warm-up call; "
                  "TPOT and TTFT from transformers' per-token timestamps",
        "rows": rows,
    }
    if out_dir is not None:
        write_json(result, out_dir, f"serve-{model}")
    return result


def format_serve_table(result: dict) -> str:
    s = result["settings"]
    rows = [[r["variant"], r["method"], f"{r['throughput_tokens_per_s']:.1f}",
             f"{r['throughput_vs_dense']:.2f}x" if "throughput_vs_dense" in r else "",
             f"{r['throughput_vs_best_dense']:.2f}x ({r['best_dense']})" if "throughput_vs_best_dense" in r else "",
             f"{r['tpot_ms_median']:.2f}", f"{r['tpot_ms_p95']:.2f}", f"{r['ttft_ms_median']:.0f}",
             _pass_cell(r, "decode_only"), _pass_cell(r, "with_prefill"),
             str(r["max_requests_in_flight"]), f"{r['peak_memory_GiB']:.2f}" if r["peak_memory_GiB"] is not None else "",
             f"{r['requests_finished']}/{s['requests']}", str(r["num_blocks"])] for r in result["rows"]]
    title = (f"{s['model']} ({s['dtype']}) on {result['device']}, transformers {result['versions']['transformers']}, "
             f"{s['requests']} requests of {s['prompt_lengths'][0]}-{s['prompt_lengths'][1]} tokens, "
             f"{s['new_tokens']} new, cache {s['cache_gib']} GiB ({s['cache_tokens_dense']} tokens for dense), "
             f"budget {s['budget']}")
    return markdown_table(title, ["variant", "method", "tokens/s", "vs dense", "vs best dense", "TPOT median ms", "TPOT p95 ms",
                                  "TTFT median ms", "decode-only pass ms (count)", "prefill pass ms (count)",
                                  "max in flight", "peak GiB", "finished", "cache blocks"], rows)


def _pass_cell(row: dict, kind: str) -> str:
    p = row.get("passes", {}).get(kind)  # JSON of runs before the pass clock have no "passes"
    return f"{p['median_ms']:.1f} ({p['passes']})" if p and p["passes"] else ""
