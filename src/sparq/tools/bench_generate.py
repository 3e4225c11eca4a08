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
from ..methods import Dense, SparQSketch

# Random-weight model shapes (no download): built from a config on the GPU.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
}


def build_model(name: str, max_positions: int, dtype: torch.dtype = torch.bfloat16, tp: int = 1):
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
        free = torch.cuda.mem_get_info()[0]
        if n_params * torch.finfo(dtype).bits // 8 > free:
            raise ValueError(f"{name} (tp={tp}) needs {n_params * 2 / 2**30:.0f} GiB of weights per GPU, "
                             f"{free / 2**30:.0f} GiB free: use more GPUs (--tp under torchrun)")
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        return model.eval()
    from ..models import resolve

    return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype).cuda().eval()


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
    kv_dense, kv_sparq = (kv_bytes_per_token(cfg, sparq=s) for s in (False, True))
    sketch_spec = (sketch_bits, 128) if sketch else None
    kv_sketch = kv_dense + (cfg.num_hidden_layers * cfg.num_key_value_heads
                            * (head_dim * sketch_bits // 8 + 4 * head_dim // 128)) // max(1, tp)
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
            methods += [(f"sketch{sketch_bits}b 1/{c}", SparQSketch(1 / c, bits=sketch_bits), None) for c in sketch]
            if auto:  # the policy: dense or SparQ at 1/auto, whichever autotune measures faster
                methods.append((f"auto 1/{auto}", SparQConfig.from_compression(auto, head_dim=head_dim,
                                                                               reallocate=True), "auto"))
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


def format_table(result: dict) -> str:
    """Markdown table of a bench_generate result (one row per batch, context, method)."""
    lines = [f"{result['model']} on {result['device']}, torch {result['versions']['torch']}, "
             f"read bandwidth {result['read_bandwidth_TBps']:.2f} TB/s, {result['new_tokens']} decode steps timed",
             "| batch | context | method | ms/step | tokens/s | floor ms | of floor | vs dense | prefill s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['floor_ms']:.2f} | {100 * r['fraction_of_floor']:.0f}% | {r['speedup_vs_dense']:.2f}x | "
                     f"{r['prefill_s']:.1f} | {r.get('peak_memory_GiB', float('nan')):.1f} |")
    for s in result.get("skipped", []):
        lines.append(f"| {s['batch']} | {s['context']} | skipped | {s['reason']} | | | | | | |")
    return "\n".join(lines)
