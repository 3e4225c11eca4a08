"""Every place where SparQ's serving route makes the host wait for the device (a CUDA sync).

Runs a small continuous batch ("paged|sparq", the default method) with
`torch.cuda.set_sync_debug_mode("warn")` and prints each distinct synchronizing call once, with the
innermost frames of sparq (and transformers) that led to it, and how often it happened per pass.
A sync inside a layer stalls the launch pipeline: the host waits for every queued kernel, then the
device waits for the host. Run on the device machine (transformers 5.17 / 5.18):
    PYTHONPATH=src python benchmarks/serve_syncs.py --requests 4 --prompt 4096 --new-tokens 8
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--method", default="default")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    a = ap.parse_args()
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import sparq
    from sparq import serving
    from sparq.methods import build_method
    from sparq.tools.bench_generate import build_model
    from sparq.tools.bench_serve import _prompts

    lm = build_model(a.model, a.prompt + a.new_tokens + 1, device="cuda")
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    method = None if a.method == "dense" else build_method(a.method, "1/8", head_dim)
    prompts = _prompts(a.requests, a.prompt, a.prompt, lm.config.vocab_size, 0)
    gen = GenerationConfig(max_new_tokens=a.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(block_size=256, num_blocks=a.requests * (a.prompt // 256 + 2) + 8,
                                  max_batch_tokens=a.max_batch_tokens, use_cuda_graph=False)
    sites: collections.Counter = collections.Counter()
    passes = [0]
    lm.model.register_forward_pre_hook(lambda *args: passes.__setitem__(0, passes[0] + 1))

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/sparq/" in f.filename or "transformers/" in f.filename]
        where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}({f.name})" for f in reversed(frames[-4:]))
        sites[where or f"{filename}:{lineno}"] += 1

    ctx = sparq.enabled(lm, method, fast_loop=False) if method is not None else None
    if ctx is not None:
        ctx.__enter__()
        serving.use_paged(lm)
    else:
        lm.set_attn_implementation("paged|sdpa")
    lm.generate_batch([p[:64] for p in prompts[:2]], generation_config=gen, continuous_batching_config=cb,
                      max_new_tokens=2)  # warm-up (compiles, allocates)
    passes[0] = 0
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        lm.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, max_new_tokens=a.new_tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"{passes[0]} forward passes, {sum(sites.values())} synchronizing calls seen from sparq/transformers frames:")
    for where, n in sites.most_common():
        print(f"  {n / max(1, passes[0]):7.2f} per pass  {where}")


if __name__ == "__main__":
    main()
