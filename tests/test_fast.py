"""The static-cache fast decode loop equals Hugging Face generation (dense and SparQ), on the CPU."""

from __future__ import annotations

import pytest
import torch

import sparq
from sparq import SparQConfig
from sparq.fast import FastDecoder, kv_bytes_per_token
from test_hf import greedy, prompts, tiny


def left_aligned(ids, mask):
    """HF left-padded prompts -> left-aligned ids and lengths, as FastDecoder takes them."""
    lengths = mask.sum(-1)
    out = torch.zeros_like(ids)
    for b, n in enumerate(lengths.tolist()):
        out[b, :n] = ids[b, ids.shape[1] - n:]
    return out, lengths


def hf_greedy(model, ids, mask, method: str, n: int):
    """HF generate's greedy tokens with `method` ("dense" or "sparq" at a tight budget), and the
    method as FastDecoder takes it."""
    if method == "dense":
        return greedy(model, ids, mask, n=n), "dense"
    cfg = SparQConfig(r=4, k=6, local_window=2)
    with sparq.enabled(model, cfg):
        return greedy(model, ids, mask, n=n), cfg


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["dense", "sparq"])
def test_fast_decoder_equals_hf_generate(arch, method):
    model = tiny(arch)
    ids, mask, _ = prompts()
    expected, method = hf_greedy(model, ids, mask, method, 8)
    aligned, lengths = left_aligned(ids, mask)
    dec = FastDecoder(model, method, batch=3, max_len=64, prefill_chunk=16)
    got, timings = dec.generate(aligned, lengths, max_new_tokens=8)
    assert torch.equal(got, expected)
    assert timings.steps == 7


def test_fast_decoder_rejects_bad_input():
    model = tiny("llama")
    with pytest.raises(TypeError, match="method"):
        FastDecoder(model, "magic", batch=1, max_len=8)
    with pytest.raises(ValueError, match="Llama-family"):
        FastDecoder(tiny("gemma3"), "dense", batch=1, max_len=8)
    dec = FastDecoder(model, "dense", batch=1, max_len=8)
    with pytest.raises(ValueError, match="exceed max_len"):
        dec.generate(torch.ones(1, 6, dtype=torch.long), torch.tensor([6]), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(torch.ones(1, 6, dtype=torch.long), torch.tensor([6]), max_new_tokens=0)
    with pytest.raises(ValueError, match="lengths"):
        dec.prefill(torch.ones(1, 6, dtype=torch.long), torch.tensor([7]))
    with pytest.raises(ValueError, match="lengths"):
        dec.prefill(torch.ones(1, 6, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(TypeError, match="input_ids"):
        dec.prefill(torch.ones(6), torch.tensor([6]))


def test_memory_accounting():
    model = tiny("llama")
    dense = kv_bytes_per_token(model.config, sparq=False)
    assert dense == 2 * 2 * 16 * 2 * 2  # layers * (K+V) * Hkv * d * bytes
    assert kv_bytes_per_token(model.config, sparq=True) == dense * 3 // 2


def test_switching_methods_from_one_prefill_equals_fresh_decoders():
    model = tiny("llama")
    ids, mask, _ = prompts()
    aligned, lengths = left_aligned(ids, mask)
    cfg = SparQConfig(r=2, k=5, local_window=1)
    shared = FastDecoder(model, "dense", batch=3, max_len=64, keep_key_t=True)
    first = shared.prefill(aligned, lengths)
    snap = shared.snapshot()
    results = {}
    for name, method in (("dense", "dense"), ("sparq", cfg), ("dense2", "dense")):
        shared.restore(snap)
        shared.use(method)
        tokens, _ = shared.decode(6)
        results[name] = torch.cat([first[:, None], tokens], 1)
    assert torch.equal(results["dense"], results["dense2"])
    for name, method in (("dense", "dense"), ("sparq", cfg)):
        fresh, _ = FastDecoder(model, method, batch=3, max_len=64).generate(aligned, lengths, max_new_tokens=7)
        assert torch.equal(results[name], fresh), name
    assert not torch.equal(results["dense"], results["sparq"])
    with pytest.raises(ValueError, match="keep_key_t"):
        FastDecoder(model, "dense", batch=3, max_len=64).use(cfg)


def test_compiled_layer_functions_give_the_same_tokens():
    """torch.compile of pre/post attention (the CUDA default) computes what the eager path does."""
    model = tiny("qwen3")  # QK-norm exercises every branch
    ids, mask, _ = prompts()
    aligned, lengths = left_aligned(ids, mask)
    eager, _ = FastDecoder(model, "dense", batch=3, max_len=64, compile=False).generate(aligned, lengths, 6)
    compiled, _ = FastDecoder(model, "dense", batch=3, max_len=64, compile=True).generate(aligned, lengths, 6)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # GQA 4/2 and MQA 4/1
def test_fast_decoder_fresh_random_prompts(arch):
    """Fresh seed, odd ragged lengths, odd budgets: the fast loop's SparQ equals HF SparQ generation."""
    seed = torch.seed() % 2**31
    model = tiny(arch)
    ids, mask, _ = prompts(batch=4, longest=37, seed=seed)
    cfg = SparQConfig(r=3, k=7, local_window=2)
    with sparq.enabled(model, cfg):
        expected = greedy(model, ids, mask, n=6)
    aligned, lengths = left_aligned(ids, mask)
    got, _ = FastDecoder(model, cfg, batch=4, max_len=53, prefill_chunk=11).generate(aligned, lengths, 6)
    assert torch.equal(got, expected), f"seed {seed}"


def test_autotune_keeps_the_state_and_picks_a_candidate():
    model = tiny("llama")
    ids, mask, _ = prompts()
    aligned, lengths = left_aligned(ids, mask)
    cfg = SparQConfig(r=4, k=6, local_window=2)
    expected = {}
    for method in ("dense", cfg):
        expected[method], _ = FastDecoder(model, method, batch=3, max_len=64).generate(aligned, lengths, 6)
    dec = FastDecoder(model, cfg, batch=3, max_len=64)
    first = dec.prefill(aligned, lengths).clone()
    before = dec.snapshot()
    times = dec.autotune(steps=2)
    assert set(times) == {"dense", cfg} and all(t > 0 for t in times.values())
    assert dec.method == min(times, key=times.get)
    assert all(torch.equal(a, b) for a, b in zip(before, dec.snapshot()))  # timing steps undone
    rest, _ = dec.decode(5)
    assert torch.equal(torch.cat([first[:, None], rest], 1), expected[dec.method])


def test_fused_projection_weights_leave_the_model_unchanged():
    model = tiny("qwen2")  # q/k/v biases
    ids, mask, _ = prompts()
    before = greedy(model, ids, mask, n=6)
    n_params = sum(p.numel() for p in model.parameters())
    dec = FastDecoder(model, "dense", batch=3, max_len=64)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert torch.equal(greedy(model, ids, mask, n=6), before)
    FastDecoder(model, "dense", batch=3, max_len=64)  # a second decoder reuses the adjacent weights
    unfused = FastDecoder(model, "dense", batch=3, max_len=64, fuse_weights=False)
    aligned, lengths = left_aligned(ids, mask)
    a, _ = dec.generate(aligned, lengths, 6)
    b, _ = unfused.generate(aligned, lengths, 6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["dense", "sparq"])
def test_fast_generate_from_a_padded_batch_equals_hf(method):
    model = tiny("llama")
    ids, mask, _ = prompts()  # left-padded, as a tokenizer pads for generation
    expected, method = hf_greedy(model, ids, mask, method, 6)
    got, _ = sparq.fast_generate(model, ids, mask, method, 6)
    assert torch.equal(got, expected)
    eos = int(expected[0, 2])
    cut, _ = sparq.fast_generate(model, ids, mask, method, 6, eos_token_id=eos)
    assert (cut[0, 2:] == eos).all() and torch.equal(cut[0, :2], expected[0, :2])
    with pytest.raises(ValueError, match="attention_mask"):
        sparq.fast_generate(model, ids, mask[:, 1:], "dense", 2)
