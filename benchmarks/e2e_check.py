"""GPU check of the fast decode loop, then `bench generate` grids. Run on the device machine.

1. Correctness: FastDecoder (dense; SparQ on the kernels) against Hugging Face generate (dense;
   SparQ via the reference) on a tiny fp16 Llama, ragged prompts: token agreement.
2. Dense attention options inside the loop for one 8B layer (is our dense baseline the best?).
3. bench_generate on the SmolLM2 shape and the Llama-3-8B shape.
Writes JSON to $OUT (or benchmarks/results).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

import sparq
from sparq import SparQConfig
from sparq.tools.bench_generate import bench_generate, format_row
from sparq.fast import FastDecoder
from sparq.methods import Dense, SparQ

out_dir = os.environ.get("OUT", "benchmarks/results")
which = sys.argv[1] if len(sys.argv) > 1 else "all"


def correctness():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         initializer_range=0.1, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    B, L = 4, 700
    lengths = torch.tensor([700, 523, 311, 97])
    aligned = torch.randint(1, 512, (B, L))
    left = torch.zeros_like(aligned)
    mask = torch.zeros_like(aligned)
    for b, n in enumerate(lengths.tolist()):
        aligned[b, n:] = 0
        left[b, L - n:] = aligned[b, :n]
        mask[b, L - n:] = 1
    scfg = SparQConfig(r=8, k=32, local_window=8)
    for name, method in (("dense", Dense()), ("sparq", scfg)):
        kw = dict(attention_mask=mask.cuda(), max_new_tokens=24, do_sample=False)
        if name == "dense":
            hf = model.generate(left.cuda(), **kw)[:, L:]
        else:
            with sparq.enabled(model, method):
                hf = model.generate(left.cuda(), **kw)[:, L:]
        fast, _ = FastDecoder(model, method, batch=B, max_len=L + 32).generate(aligned, lengths, 24)
        agree = (fast.cpu() == hf.cpu()).float().mean().item()
        first_diff = [(row != 0).nonzero()[0].item() if (row != 0).any() else None
                      for row in (fast.cpu() != hf.cpu()).int()]
        print(f"correctness {name}: token agreement {agree:.3f}, first mismatch per row {first_diff}", flush=True)
    teacher_forced(model, scfg, aligned, lengths, fast)


def teacher_forced(model, scfg, aligned, lengths, tokens):
    """Feed the same tokens to the fast loop with SparQ on the kernels and on the reference: do
    free-running mismatches come from rare near-tie flips (which then compound) or from every step?"""
    from sparq import reference

    B = aligned.shape[0]
    L = aligned.shape[1]
    logs = {}
    class ReferenceSparQ(SparQ):  # the same method, always on the PyTorch reference
        def attend(self, x):
            return reference.sparq_reference(x.query, x.key, x.value, self.config, x.valid, x.scale,
                                             key_t=x.key_t, value_sum=x.value_sum)

    for name in ("kernels", "reference"):
        method = SparQ(scfg) if name == "kernels" else ReferenceSparQ(scfg)
        dec = FastDecoder(model, method, batch=B, max_len=L + 32, compile=False)
        rec = []
        fam = dec.family
        fam.logits = (lambda f: (lambda x: rec.append(f(x)) or rec[-1]))(fam.logits)
        dec.prefill(aligned, lengths)
        for i in range(tokens.shape[1] - 1):
            dec.tokens.copy_(tokens[:, i])
            dec.step(use_graph=False)
        logs[name] = torch.stack([r[:, 0].float() for r in rec[1:]], 1)  # [B, steps, V]
    a, b = logs["kernels"], logs["reference"]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff = (a - b).abs().amax(-1)
    print(f"teacher-forced SparQ kernels vs reference: argmax agreement {agree:.3f} over {diff.numel()} steps; "
          f"max |logit diff| median {diff.median().item():.2e}, max {diff.max().item():.2e}", flush=True)


def dense_options(B=8, Hq=32, Hkv=8, S=32768, d=128):
    k = torch.randn(B, Hkv, S, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, 1, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.full((B,), S - 5, device="cuda")
    valid = torch.arange(S, device="cuda")[None] < lengths[:, None]
    from triton.testing import do_bench

    from torch.nn.attention import SDPBackend, sdpa_kernel

    ks, vs = k[:, :, :S - 5].contiguous(), v[:, :, :S - 5].contiguous()

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)
        return fn

    opts = {
        "sdpa mask, whole buffer (loop's dense)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :],
                                                                         enable_gqa=True),
        "sdpa flash, exact length": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn, exact length": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    floor = 2 * B * Hkv * S * d * 2 / 3.0e12 * 1e6
    for name, fn in opts.items():
        try:
            us = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            print(f"dense option B={B} S={S} Hq/Hkv={Hq}/{Hkv} d={d} {name:30s} {us:8.1f} us (floor ~{floor:.0f} us)",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"dense option {name}: failed {type(e).__name__}: {e}", flush=True)


if which == "check":
    correctness()
    for shape in ((1, 32, 8, 4096, 128), (1, 32, 8, 32768, 128), (8, 32, 8, 32768, 128), (1, 32, 8, 131072, 128),
                  (8, 9, 3, 32768, 64)):
        dense_options(*shape)
GRIDS = {
    "smollm2": ("smollm2-135m", (1, 8), (4096, 32768)),
    "llama-short": ("llama3-8b", (1, 8, 16), (4096,)),
    "llama-32k": ("llama3-8b", (1, 8), (32768,)),
    "llama-long": ("llama3-8b", (1,), (65536, 131072)),
    "llama-32k-h200": ("llama3-8b", (8, 16), (32768,)),  # batch 16 needs more than 80 GB
    "llama-tp": ("llama3-8b", (1, 8), (32768,)),      # under torchrun: tensor parallel over its GPUs
    "llama70b-tp": ("llama3-70b", (1, 8), (32768,)),
}
tensor_parallel = "WORLD_SIZE" in os.environ
for name in sys.argv[2:] if which == "bench" else []:
    model, batches, contexts = GRIDS[name]
    t = time.time()
    r = bench_generate(model, batches=batches, contexts=contexts, new_tokens=48, out_dir=out_dir,
                       tensor_parallel=tensor_parallel)
    if "path" not in r:  # not rank 0
        continue
    print(f"{name}: {time.time() - t:.0f} s -> {r['path']}", flush=True)
    for row in r["rows"]:
        print(format_row(row))
    for sk in r["skipped"]:
        print("skipped", sk)
    del r
    torch.cuda.empty_cache()
