"""End-to-end decode benchmark: dense and SparQ in the same static-cache, CUDA-graph loop.

For each (batch, context) one dense prefill fills a `FastDecoder` cache; then each method decodes
`new_tokens` steps from that same state (restored between methods), so every method sees the same
model, cache and loop and differs only in its attention. Reported per method: ms per decode step,
tokens/s (batch x steps / time), the bandwidth floor of the step (weights read once + the method's
fraction of the K/V cache, over the measured read bandwidth) and the fraction of it reached, the
prefill time and the peak GPU memory, plus what each variant's cache costs per token.

Tensor parallelism (`tensor_parallel=True`, under torchrun, one process per GPU): every rank holds
1/tp of each layer's heads and MLP columns (random weights built in place, so a 70B shape needs no
full copy anywhere) and the row-parallel outputs are summed with NCCL inside the captured step.
Floors are then per GPU (its weight slice plus its KV heads) and leave the all-reduces out; rank 0
reports.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch

from ..config import SparQConfig
from ..fast import FastDecoder, kv_bytes_per_token
from ..methods import Dense, SparQSketch, default_method

# Random-weight model shapes (no download): built from a config on the GPU.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                        tie_word_embeddings=True),
    # CPU smoke tests of the benches (a shape, not a model anyone runs)
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=96, rope_theta=10000.0, tie_word_embeddings=False),
}


def build_model(name: str, max_positions: int, dtype: torch.dtype = torch.bfloat16, tp: int = 1,
                device: str = "cuda"):
    """A random-weight Llama of a named shape, or a real model from an HF id / local path.

    tp > 1 (named shapes only): one rank's slice of the model, i.e. 1/tp of the query and KV heads
    and of the MLP columns (embedding and LM head whole), for `FastDecoder(..., tp_group=...)`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name in SHAPES:
        shape = dict(SHAPES[name])
        if tp > 1:
            heads, kv, inter = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
            if heads % tp or kv % tp or inter % tp:
                raise ValueError(f"tp={tp} must divide the heads ({heads}, {kv} KV) and the MLP width ({inter})")
            shape.update(num_attention_heads=heads // tp, num_key_value_heads=kv // tp, intermediate_size=inter // tp,
                         head_dim=shape["hidden_size"] // heads)
        cfg = LlamaConfig(max_position_embeddings=max_positions, **shape)
        n_params = _param_count(cfg)
        if torch.device(device).type == "cuda":
            free = torch.cuda.mem_get_info()[0]
            if n_params * torch.finfo(dtype).bits // 8 > free:
                raise ValueError(f"{name} (tp={tp}) needs {n_params * 2 / 2**30:.0f} GiB of weights per GPU, "
                                 f"{free / 2**30:.0f} GiB free: use more GPUs (--tp under torchrun)")
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        return model.eval()
    from ..models import resolve

    return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype).to(device).eval()


def _param_count(cfg) -> int:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.hidden_size * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_hidden_layers * (attn + mlp + 2 * cfg.hidden_size) + emb + cfg.hidden_size


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (B rows of it)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embed
    return total if tied else total - embed.numel() * embed.element_size()


def bench_generate(model: str = "llama3-8b", batches=(1, 8), contexts=(4096, 32768), new_tokens: int = 64,
                   compressions=(4, 8, 16), *, auto: int | None = 8, ragged: bool = False, tensor_parallel: bool = False, out_dir: str | os.PathLike | None =
                   "benchmarks/results", print_rows: bool = True, sketch: tuple[int, ...] = (),
                   sketch_bits: int = 2) -> dict:
    """Run the grid; returns {"device", "versions", "rows", ...} and writes it as JSON under out_dir.

    sketch: budgets 1/N that also run `sparq-sketch` (its packed `sketch_bits`-bit key sketch kept by
    the same cache, 128-token blocks, the method's defaults otherwise), beside dense and SparQ."""
    import triton

    from .bench_kernels import measure_read_bandwidth

    if not torch.cuda.is_available():
        raise RuntimeError("bench generate needs a CUDA device")
    tp_group, tp, rank = None, 1, 0
    if tensor_parallel:  # under torchrun: one process per GPU, each holding 1/tp of every layer
        import torch.distributed as dist

        if not dist.is_initialized():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        tp_group, tp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
        print_rows = print_rows and rank == 0
        out_dir = out_dir if rank == 0 else None
    bw = measure_read_bandwidth()
    max_ctx = max(contexts) + new_tokens + 1
    lm = build_model(model, max_ctx, tp=tp)
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w_bytes = weight_bytes_per_step(lm)
    # the whole model's cache (all ranks together under TP, as the weight bytes are counted)
    kv_dense, kv_sparq = (kv_bytes_per_token(cfg, sparq=s) for s in (False, True))
    sketch_spec = (sketch_bits, 128) if sketch else None
    kv_sketch = kv_bytes_per_token(cfg, sketch=(sketch_bits, 128))
    total_mem = torch.cuda.get_device_properties(0).total_memory
    rows, skipped = [], []
    for context in contexts:
        for batch in batches:
            max_len = context + new_tokens + 1
            need = kv_sparq * batch * max_len + torch.cuda.memory_allocated() + (6 << 30)
            if need > total_mem:
                skipped.append({"batch": batch, "context": context,
                                "reason": f"needs ~{need / 2**30:.0f} GiB of {total_mem / 2**30:.0f}"})
                if print_rows:
                    print(f"skip B={batch} S={context}: {skipped[-1]['reason']}", flush=True)
                continue
            torch.manual_seed(0)
            lengths = torch.full((batch,), context, dtype=torch.long)
            if ragged and batch > 1:  # spread lengths over [context/2, context]
                lengths = context - torch.arange(batch) * (context // 2) // max(1, batch - 1)
            ids = torch.randint(0, cfg.vocab_size, (batch, context))
            torch.cuda.reset_peak_memory_stats()
            # prefill chunks of ~16k tokens in all keep activations small next to the cache
            dec = FastDecoder(lm, Dense(), batch=batch, max_len=max_len, keep_key_t=True, keep_sketch=sketch_spec,
                              prefill_chunk=max(256, 16384 // batch), tp_group=tp_group)
            torch.cuda.synchronize()
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            dec.prefill(ids, lengths)
            t1.record()
            torch.cuda.synchronize()
            prefill_s = t0.elapsed_time(t1) / 1e3
            snap = dec.snapshot()
            kv_read_dense = kv_dense * int(lengths.sum())
            methods = [("dense", Dense(), 1.0)] + [
                (f"sparq 1/{c}", SparQConfig.from_compression(c, head_dim=head_dim, reallocate=True), None) for c in compressions]
            # the default method's settings (methods.DEFAULT_SPEC: no local window, no reallocation)
            methods += [(f"sketch{sketch_bits}b 1/{c}", SparQSketch(1 / c, bits=sketch_bits, local_fraction=0.0,
                                                                     reallocate=False), None) for c in sketch]
            if auto:  # the policy: dense or the default method at 1/auto, whichever autotune measures faster
                methods.append((f"auto 1/{auto}", default_method(1 / auto, head_dim), "auto"))
            dense_ms = None
            for label, method, frac in methods:
                dec.restore(snap)
                if frac == "auto":
                    dec.autotune([Dense(), method])
                    method, frac = dec.method, (1.0 if dec.method == Dense() else None)
                    label += " -> " + dec.method.name
                else:
                    dec.use(method)
                    dec.decode(2)  # capture the graph, warm up
                dec.restore(snap)
                _, secs = dec.decode(new_tokens)
                ms = secs / new_tokens * 1e3
                if frac is None:
                    frac = sum(method.data_fraction(int(n), head_dim) * int(n) for n in lengths) / int(lengths.sum())
                floor_ms = (w_bytes + frac * kv_read_dense) / bw * 1e3
                dense_ms = ms if method == Dense() else dense_ms
                row = {"model": model, "tp": tp, "batch": batch, "context": context, "ragged": ragged, "method": label,
                       "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms, "kv_fraction_read": frac,
                       "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms,
                       "speedup_vs_dense": dense_ms / ms, "prefill_s": prefill_s,
                       "cache_bytes_per_token": (kv_dense if method == Dense() else
                                                 kv_sketch if isinstance(method, SparQSketch) else kv_sparq)}
                rows.append(row)
                if print_rows:
                    print(format_row(row), flush=True)
            peak = torch.cuda.max_memory_allocated()
            for row in rows[-len(methods):]:
                row["peak_memory_GiB"] = peak / 2**30
            del dec, snap
            torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    free_for_cache = total_mem - w_bytes - (6 << 30)
    result = {
        "device": props.name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "model": model, "tensor_parallel": tp, "new_tokens": new_tokens, "read_bandwidth_TBps": bw / 1e12,
        "weight_bytes_per_step": w_bytes,
        "cache_bytes_per_token": {"dense": kv_dense, "sparq_fp16_key_t": kv_sparq, f"sketch_{sketch_bits}bit": kv_sketch},
        "max_tokens_in_cache": {"dense": free_for_cache // kv_dense, "sparq": free_for_cache // kv_sparq,
                                f"sketch_{sketch_bits}bit": free_for_cache // kv_sketch},
        "timing": "wall clock over CUDA-graph replays of whole decode steps (greedy), after a warm-up",
        "rows": rows, "skipped": skipped,
    }
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        tag = f"-tp{tp}" if tp > 1 else ""
        file = path / f"generate-{model}{tag}-{props.name.replace(' ', '_')}-{stamp}.json"
        file.write_text(json.dumps(result, indent=1))
        result["path"] = str(file)
    return result


def format_row(row: dict) -> str:
    return (f"{row['model']:>12s} B={row['batch']:<3d} S={row['context']:<7d} {row['method']:<11s} "
            f"{row['ms_per_step']:8.2f} ms/step {row['tokens_per_s']:9.1f} tok/s  floor {row['floor_ms']:7.2f} ms "
            f"({100 * row['fraction_of_floor']:5.1f}%)  x{row['speedup_vs_dense']:.2f} vs dense")


def markdown_table(title: str, header: list[str], rows: list[list]) -> str:
    """A title line and a markdown table (cells as given; short rows are padded with empty cells)."""
    out = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r + [""] * (len(header) - len(r))) + " |" for r in rows]
    return "\n".join(out)


def format_table(result: dict) -> str:
    """Markdown table of a bench_generate result (one row per batch, context, method)."""
    rows = [[r["batch"], r["context"], r["method"], f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:.1f}",
             f"{r['floor_ms']:.2f}", f"{100 * r['fraction_of_floor']:.0f}%", f"{r['speedup_vs_dense']:.2f}x",
             f"{r['prefill_s']:.1f}", f"{r.get('peak_memory_GiB', float('nan')):.1f}"] for r in result["rows"]]
    rows += [[s["batch"], s["context"], "skipped", s["reason"]] for s in result.get("skipped", [])]
    return markdown_table(f"{result['model']} on {result['device']}, torch {result['versions']['torch']}, "
                          f"read bandwidth {result['read_bandwidth_TBps']:.2f} TB/s, {result['new_tokens']} decode steps timed",
                          ["batch", "context", "method", "ms/step", "tokens/s", "floor ms", "of floor", "vs dense",
                           "prefill s", "peak GiB"], rows)


# ---- engine "hf": model.generate (dense with transformers' settings, SparQ through sparq.enabled) next to
# the fast loop, same model, shapes and run --------------------------------------------------------------

HF_DENSE_SETTINGS = ("dynamic", "static+compile")


class _Clock:
    """A logits processor that records when each step's logits are ready (the prefill's first, then one
    per decode step), and the memory allocated then; it synchronises the device, as generate's own
    per-step stop check does."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.memory: list[int] = []

    def __call__(self, input_ids, scores):
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.memory.append(torch.cuda.memory_allocated(self.device))
        self.times.append(time.perf_counter())
        return scores


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - informational only
        return -1


def _hf_row(lm, ids, mask, new_tokens: int, device: torch.device, **gen) -> dict:
    """One timed model.generate call (after a warm-up call of the same shape: compilation, graph capture):
    decode ms per token from the clock (first token = prefill excluded), peak memory over the timed call,
    the growth of allocated memory between the second and the last decode step, and how many graphs
    dynamo compiled during the timed call (0: no recompilation)."""
    import time

    from transformers import LogitsProcessorList

    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0, **gen)
    lm.generate(ids, **kw, logits_processor=LogitsProcessorList([_Clock(device)]))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = _Clock(device)
    graphs = _dynamo_graphs()
    t0 = time.perf_counter()
    out = lm.generate(ids, **kw, logits_processor=LogitsProcessorList([clock]))
    steps = len(clock.times) - 1
    if out.shape[1] != ids.shape[1] + new_tokens or steps < 1:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, {new_tokens} asked")
    ms = 1e3 * (clock.times[-1] - clock.times[0]) / steps
    row = {"ms_per_token": ms, "tokens_per_s": ids.shape[0] * 1e3 / ms, "prefill_s": clock.times[0] - t0,
           "compiled_graphs_during_timed_call": (_dynamo_graphs() - graphs) if graphs >= 0 else None}
    if device.type == "cuda":
        row["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        row["memory_growth_MiB"] = (clock.memory[-1] - clock.memory[1]) / 2**20 if len(clock.memory) > 2 else 0.0
    return row


def _fast_row(lm, method, aligned, lengths, new_tokens: int, device: torch.device, prefill_chunk: int) -> dict:
    """The fast loop alone (as `sparq.fast_generate` runs it): prefill, capture + warm-up, timed steps."""
    import time

    from ..fast import FastDecoder

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dec = FastDecoder(lm, method, batch=aligned.shape[0], max_len=int(lengths.max()) + new_tokens + 1,
                      prefill_chunk=prefill_chunk)
    t0 = time.perf_counter()
    dec.prefill(aligned, lengths)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    snap = dec.snapshot()
    dec.decode(2)  # capture the graph, warm up
    dec.restore(snap)
    _, secs = dec.decode(new_tokens - 1)
    ms = 1e3 * secs / (new_tokens - 1)
    row = {"ms_per_token": ms, "tokens_per_s": aligned.shape[0] * 1e3 / ms, "prefill_s": prefill_s}
    if device.type == "cuda":
        row["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del dec, snap
    return row


def bench_hf_generate(model: str = "llama3.2-1b", batches=(4,), contexts=(16384,), new_tokens: int = 64,
                      compressions=(8,), *, engines=("hf", "fast"), dense_settings=HF_DENSE_SETTINGS,
                      hf_loop: bool = False, ragged: bool = False, device: str | None = None,
                      dtype: torch.dtype = torch.bfloat16, out_dir: str | os.PathLike | None = "benchmarks/results",
                      print_rows: bool = True, strict: bool = False) -> dict:
    """Decode ms/token, tokens/s and peak memory of dense and SparQ 1/N (N in compressions) through `model.generate`
    (engine "hf": dense with each of `dense_settings` -- "dynamic" is transformers' default cache,
    "static+compile" its static cache, which generate compiles on CUDA --, and SparQ under
    `sparq.enabled`, which hands decoding to the fast loop; hf_loop=True adds SparQ under
    `sparq.enabled(..., fast_loop=False)`, transformers' own loop over SparQCache) and through the
    fast loop itself (engine "fast": `FastDecoder`, as `sparq.fast_generate` runs it), same model,
    prompts and run. Greedy, min_new_tokens = max_new_tokens = new_tokens. A variant that raises gets
    its error in its row (strict=True: raises). Runs on the CPU too
    (device="cpu", e.g. the "tiny" shape: a smoke test; times there mean nothing). Returns
    {"device", "versions", "rows", ...} and writes it as JSON under out_dir."""
    import transformers

    import sparq

    from ..fast import left_align
    from ..methods import Dense

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = set(engines) - {"hf", "fast"}
    if unknown or not engines:
        raise ValueError(f"engines must be among 'hf', 'fast', got {list(engines)}")
    bad = set(dense_settings) - set(HF_DENSE_SETTINGS)
    if bad:
        raise ValueError(f"dense_settings must be among {HF_DENSE_SETTINGS}, got {sorted(bad)}")
    max_ctx = max(contexts) + new_tokens + 1
    lm = build_model(model, max_ctx, dtype=dtype, device=str(dev))
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sparq_cfgs = {c: SparQConfig.from_compression(c, head_dim=head_dim, reallocate=True) for c in compressions}
    rows = []

    def measured(fn, *args, **kw) -> dict:
        """A row's numbers, or its error (one failing variant -- say, a compile error -- must not
        lose the others' numbers of a long GPU run)."""
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - reported in the row and printed
            if strict:
                raise
            return {"ms_per_token": float("nan"), "tokens_per_s": float("nan"), "error": f"{type(e).__name__}: {e}"}

    def emit(row: dict) -> None:
        rows.append(row)
        if print_rows and "error" in row:
            print(f"{row['engine']:>4s} {row['method']:<34s} B={row['batch']:<3d} S={row['context']:<7d} "
                  f"FAILED: {row['error'][:300]}", flush=True)
        elif print_rows:
            mem = row.get("peak_memory_GiB")
            print(f"{row['engine']:>4s} {row['method']:<34s} B={row['batch']:<3d} S={row['context']:<7d} "
                  f"{row['ms_per_token']:9.2f} ms/token {row['tokens_per_s']:9.1f} tok/s"
                  + (f"  peak {mem:6.2f} GiB" if mem is not None else ""), flush=True)

    for context in contexts:
        for batch in batches:
            torch.manual_seed(0)
            lengths = torch.full((batch,), context, dtype=torch.long)
            if ragged and batch > 1:  # spread lengths over [context/2, context], left-padded
                lengths = context - torch.arange(batch) * (context // 2) // max(1, batch - 1)
            ids = torch.randint(1, cfg.vocab_size, (batch, context))
            mask = (torch.arange(context)[None, :] >= context - lengths[:, None]).long()
            ids = (ids * mask).to(dev)
            mask = mask.to(dev)
            base = {"model": model, "batch": batch, "context": context, "ragged": ragged, "new_tokens": new_tokens}
            if "hf" in engines:
                for setting in dense_settings:
                    gen = {"cache_implementation": "static"} if setting == "static+compile" else {}
                    r = measured(_hf_row, lm, ids, mask, new_tokens, dev, **gen)
                    emit({**base, "engine": "hf", "method": f"dense ({setting})", **r})
                    _free(dev)
                sparq_runs = [("sparq.enabled", True)] + ([("sparq.enabled, fast_loop=False", False)] if hf_loop else [])
                for compression, sparq_cfg in sparq_cfgs.items():
                    for label, fast_loop in sparq_runs:
                        with sparq.enabled(lm, sparq_cfg, fast_loop=fast_loop):
                            r = measured(_hf_row, lm, ids, mask, new_tokens, dev)
                        emit({**base, "engine": "hf", "method": f"sparq 1/{compression} ({label})", **r})
                        _free(dev)
            if "fast" in engines:
                aligned, lens = left_align(ids, mask)
                chunk = max(256, 16384 // batch)
                fast_methods = [("dense", Dense())] + [(f"sparq 1/{c}", m) for c, m in sparq_cfgs.items()]
                for label, method in fast_methods:
                    with torch.inference_mode():
                        r = measured(_fast_row, lm, method, aligned, lens, new_tokens, dev, chunk)
                    emit({**base, "engine": "fast", "method": f"{label} (FastDecoder)", **r})
                    _free(dev)
            for compression in compressions:
                _compare(rows, base, compression)
    result = {
        "device": torch.cuda.get_device_properties(dev).name if dev.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "model": model, "dtype": str(dtype).replace("torch.", ""), "new_tokens": new_tokens,
        "compressions": list(compressions),
        "timing": "model.generate: wall clock between the first and the last step's logits (a logits processor "
                  "that synchronises the device; prefill excluded), after a warm-up call of the same shape; "
                  "fast loop: wall clock over CUDA-graph replays of whole decode steps after a warm-up",
        "rows": rows,
    }
    if out_dir is not None:
        write_json(result, out_dir, f"generate-hf-{model}")
    return result


def write_json(result: dict, out_dir: str | os.PathLike, prefix: str) -> None:
    """result as <out_dir>/<prefix>-<device>-<UTC stamp>.json; its path goes into result["path"]."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    file = path / f"{prefix}-{result['device'].replace(' ', '_')}-{stamp}.json"
    file.write_text(json.dumps(result, indent=1))
    result["path"] = str(file)


def _free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _compare(rows: list[dict], base: dict, compression: int) -> None:
    """Ratios on the SparQ-through-generate row: vs the fast loop's SparQ and vs the best dense generate."""
    mine = [r for r in rows if all(r.get(k) == v for k, v in base.items()) and "error" not in r]
    target = next((r for r in mine if r["method"] == f"sparq 1/{compression} (sparq.enabled)"), None)
    fast = next((r for r in mine if r["method"] == f"sparq 1/{compression} (FastDecoder)"), None)
    dense = [r for r in mine if r["engine"] == "hf" and r["method"].startswith("dense")]
    if target is None:
        return
    if fast is not None:
        target["vs_fast_loop"] = target["ms_per_token"] / fast["ms_per_token"]
    if dense:
        best = min(dense, key=lambda r: r["ms_per_token"])
        target["speedup_vs_best_dense_generate"] = best["ms_per_token"] / target["ms_per_token"]
        target["best_dense_generate"] = best["method"]


def format_hf_table(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["engine"], r["method"], r["batch"], r["context"], f"failed: {r['error'][:120]}"])
            continue
        fmt = (lambda k, f="{:.2f}": f.format(r[k]) if r.get(k) is not None else "")
        rows.append([r["engine"], r["method"], r["batch"], r["context"], f"{r['ms_per_token']:.2f}",
                     f"{r['tokens_per_s']:.1f}", fmt("peak_memory_GiB"), fmt("vs_fast_loop", "{:.2f}x"),
                     fmt("speedup_vs_best_dense_generate", "{:.2f}x")])
    return markdown_table(f"{result['model']} ({result['dtype']}) on {result['device']}, torch {result['versions']['torch']}, "
                          f"transformers {result['versions']['transformers']}, {result['new_tokens']} new tokens (greedy)",
                          ["engine", "method", "batch", "context", "ms/token", "tokens/s", "peak GiB", "vs fast loop",
                           "vs best dense generate"], rows)
