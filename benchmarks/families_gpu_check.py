"""Every fast-loop family on the GPU (tiny random-weight models from tests/test_fast_families.py).

Per family: (1) fp32: the fast loop's greedy tokens with Dense() equal `model.generate`'s, and SparQ
at k >= every length equals dense (the step runs as a CUDA graph); (2) bf16, prompts of 200-400
tokens (finished sketch blocks): the default method at 1/8 through the fast loop (the sketch
kernels) against the same method through transformers' loop (`sparq.enabled(..., fast_loop=False)`,
the PyTorch path over SparQCache), and both against dense, as token agreement. Gemma 2 is dense-only.
The fp32 rows also compare the fast loop's first logits with transformers' forward and its eager
attention: transformers 5.17 runs Gemma 2 under sdpa, which ignores attn_logit_softcapping (5.24
refuses sdpa for Gemma 2); the fast loop soft-caps like the eager path.
Usage (GPU, repository root): PYTHONPATH=src:tests python benchmarks/families_gpu_check.py
Writes families-gpu-<device>-<UTC>.json to $OUT (or benchmarks/results).
"""

from __future__ import annotations

import json
import os
import time

import torch

import sparq
from sparq.fast import FastDecoder, fast_generate, left_align
from sparq.methods import Dense, default_method
from test_fast_families import ARCHS, EVERY, build
from test_hf import greedy, prompts


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def main() -> None:
    dev = os.environ.get("DEVICE", "cuda")
    rows = []
    for arch in ARCHS:
        row: dict = {"arch": arch}
        try:
            model = build(arch).to(dev)
            ids, mask, _ = prompts()
            ids, mask = ids.to(dev), mask.to(dev)
            expected = greedy(model, ids, mask, n=8)
            got, _ = fast_generate(model, ids, mask, Dense(), 8)
            row["fp32_dense_equal"] = bool(torch.equal(got, expected))
            # the first step's logits, fast loop's prefill against transformers' forward (and the top-2
            # margin: a tiny one makes a greedy flip between two correct implementations likely)
            aligned, lengths = left_align(ids, mask)
            dec = FastDecoder(model, Dense(), batch=ids.shape[0], max_len=int(lengths.max()) + 8, keep_logits=True)
            dec.prefill(aligned, lengths)
            with torch.no_grad():
                ref = model(ids, attention_mask=mask).logits[:, -1].float()
            top2 = ref.topk(2, dim=-1).values
            row["fp32_prefill_logits_max_abs_diff"] = float((dec.logits - ref).abs().max())
            row["fp32_min_top2_margin"] = float((top2[:, 0] - top2[:, 1]).min())
            if hasattr(model, "set_attn_implementation"):  # the eager formula (the reference for soft-capping)
                impl = model.config._attn_implementation
                model.set_attn_implementation("eager")
                with torch.no_grad():
                    eager = model(ids, attention_mask=mask).logits[:, -1].float()
                model.set_attn_implementation(impl)
                row["hf_attn_implementation"] = impl
                row["fp32_prefill_vs_eager_max_abs_diff"] = float((dec.logits - eager).abs().max())
            if not row["fp32_dense_equal"]:
                row["first_differing_step"] = int((got != expected).any(0).float().argmax())
            if arch != "gemma2":
                full, _ = fast_generate(model, ids, mask, EVERY, 8)
                row["fp32_sparq_full_k_equal"] = bool(torch.equal(full, expected))
                model = model.to(torch.bfloat16)
                ids, mask, _ = prompts(batch=3, longest=400, seed=3)
                ids, mask = ids.to(dev), mask.to(dev)
                hd = model.config.head_dim if getattr(model.config, "head_dim", None) else (
                    model.config.hidden_size // model.config.num_attention_heads)
                method = default_method(1 / 8, hd)
                dense = greedy(model, ids, mask, n=16)
                fast, _ = fast_generate(model, ids, mask, method, 16)
                with sparq.enabled(model, method, fast_loop=False):
                    hf = greedy(model, ids, mask, n=16)
                row.update(method=method.label, bf16_fast_vs_hf_path=agree(fast, hf),
                           bf16_fast_vs_dense=agree(fast, dense), bf16_hf_path_vs_dense=agree(hf, dense))
        except Exception as e:  # report, go on with the next family
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)
    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"families-gpu-{device.replace(' ', '_')}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    import transformers

    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                   "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
