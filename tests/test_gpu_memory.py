"""GPU: `sparq.enabled` + `generate` holds flat memory over many decode steps, with a left-padded batch
on the kernels. (CUDA only; the CPU suite checks the plan bookkeeping in test_kernels.py.)"""

from __future__ import annotations

import pytest
import torch

import sparq
from sparq.caches.dynamic import SparQCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                         initializer_range=0.1, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()


def test_generate_memory_is_flat_and_padded_batches_run_on_the_kernels(monkeypatch):
    from sparq.kernels import dispatch

    model = _model()
    steps = 500
    lengths = [4000, 3100]
    ids = torch.zeros(2, 4000, dtype=torch.long)
    mask = torch.zeros_like(ids)
    gen = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths):  # left padding, as a tokenizer batch gives
        ids[b, 4000 - n:] = torch.randint(1, 512, (n,), generator=gen)
        mask[b, 4000 - n:] = 1
    cfg = sparq.SparQConfig.from_compression(8, head_dim=32)

    runs = {"plain": 0, "padded": 0}
    real_run = dispatch.DecodePlan.run

    def counting_run(self, *args, **kwargs):
        runs["padded" if kwargs.get("starts") is not None else "plain"] += 1
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(dispatch.DecodePlan, "run", counting_run)
    memory: list[int] = []

    def record(input_ids, scores):
        torch.cuda.synchronize()
        memory.append(torch.cuda.memory_allocated())
        return scores

    from transformers import LogitsProcessorList

    with sparq.enabled(model, cfg, fast_loop=False):  # transformers' loop over SparQCache
        out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, logits_processor=LogitsProcessorList([record]))
        cache = getattr(model, sparq.hf._CTX_ATTR).cache
    assert isinstance(cache, SparQCache)
    assert out.shape[1] == 4000 + steps
    assert runs["padded"] >= (steps - 1) * 4 and runs["plain"] == 0, runs  # every decode step on the kernels
    assert len(cache.plans) == 1 and cache.plans.created <= 2, (len(cache.plans), cache.plans.created)
    # K/V of the DynamicCache grow by one position per step (inherent); nothing else may grow
    kv_per_step = 4 * 2 * 2 * 2 * 32 * 2  # layers * (K, V) * batch * KV heads * head_dim * fp16
    # The only regrowth here is the plan's capacity (4096 -> 8192 at step ~97; the Kᵀ buffer was
    # sized with 1000 positions of headroom). Compare the floor of two windows after it (single
    # steps jitter by transient tensors), net of the K/V growth between them.
    first, last = memory[150:200], memory[-50:]
    i0, i1 = 150 + first.index(min(first)), len(memory) - 50 + last.index(min(last))
    drift = (memory[i1] - memory[i0]) - kv_per_step * (i1 - i0)
    assert abs(drift) < 4 << 20, f"allocated memory drifted by {drift / 2**20:.1f} MB over {i1 - i0} steps"
    print(f"memory: {memory[0] / 2**20:.1f} MB at the first step, {memory[-1] / 2**20:.1f} MB after {steps}; "
          f"drift beyond K/V growth {drift / 2**20:.2f} MB; plans made {cache.plans.created}")
