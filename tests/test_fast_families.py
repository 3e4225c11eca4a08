"""Every model family of the fast loop (`sparq.fast.families`) on tiny random-weight models, on the
CPU: with Dense() its greedy tokens equal `model.generate`'s, with SparQ at k >= every length they
equal dense, on a left-padded batch; sliding-window layers stay dense; Gemma 2 (soft-capped
attention) runs Dense() only; anything else is refused before any work."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sparq
from sparq import SparQConfig
from sparq.fast import FAMILIES, FastDecoder, fast_generate, left_align
from sparq.fast.window import WindowCache
from sparq.methods import Dense, SparQ
from test_hf import COMMON, greedy, prompts, tiny

N = 6  # new tokens per test
EVERY = SparQ(SparQConfig(r=2, k=10_000, local_window=3))  # k >= every length: exactly dense
TIGHT = SparQConfig(r=4, k=6, local_window=2)


def random_norms(model):
    """Gemma initialises its (1 + w) norms at w = 0 and Llama's at 1: random ones expose a wrong norm."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0 if "gemma" in model.config.model_type else 1, 0.3)
    return model.eval()


def build(arch: str):
    if arch == "phi3_partial":  # Phi-4-mini style: partial rotary (half of each head), q/k/v biasless, fused
        torch.manual_seed(0)
        model = tf.Phi3ForCausalLM(tf.Phi3Config(num_attention_heads=4, num_key_value_heads=2,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.5}, **COMMON))
    elif arch == "gemma2":
        torch.manual_seed(0)
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
            attn_logit_softcapping=3.0, final_logit_softcapping=5.0,  # small caps: they bite on random weights
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            **{**COMMON, "num_hidden_layers": 3}))
    elif arch == "gemma3":
        model = tiny("gemma3")
        model.config.sliding_window = 8
    else:
        model = tiny(arch)
    model.generation_config.pad_token_id = 0
    return random_norms(model)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "phi3_partial", "gemma2", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_equals_hf_generate_and_sparq_at_full_k_equals_dense(arch):
    model = build(arch)
    ids, mask, _ = prompts()  # left-padded, lengths 40, 31, 22
    expected = greedy(model, ids, mask, n=N)
    got, _ = fast_generate(model, ids, mask, Dense(), N, prefill_chunk=16)
    assert torch.equal(got, expected)
    if arch == "gemma2":
        return  # Dense() only (test_gemma2_runs_dense_only)
    full, _ = fast_generate(model, ids, mask, EVERY, N, prefill_chunk=16)
    assert torch.equal(full, expected)


def test_every_family_is_covered():
    assert {f.name for f in FAMILIES} == {"llama", "phi3", "gemma2", "gemma3"}
    covered = {build(a).config.model_type for a in ARCHS}
    assert covered == {t for f in FAMILIES for t in f.model_types}


@pytest.mark.parametrize("arch", ["phi3_partial", "qwen3"])
def test_sparq_at_a_tight_budget_equals_hf_sparq(arch):
    """The new families' math under a real SparQ budget: the same tokens as the HF path's SparQ."""
    model = build(arch)
    ids, mask, _ = prompts()
    with sparq.enabled(model, TIGHT):
        expected = greedy(model, ids, mask, n=N)
    got, _ = fast_generate(model, ids, mask, TIGHT, N)
    assert torch.equal(got, expected)
    assert not torch.equal(got, greedy(model, ids, mask, n=N))  # the budget bites: not a dense run


def test_phi3_uses_its_fused_weights_as_they_are():
    model = build("phi3")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    before = [p.data_ptr() for p in model.parameters()]
    dec = FastDecoder(model, Dense(), batch=1, max_len=16)
    pre, post = dec.family.weights[0]
    assert pre["wqkv"].data_ptr() == attn.qkv_proj.weight.data_ptr()
    assert post["wgu"].data_ptr() == mlp.gate_up_proj.weight.data_ptr()
    assert (dec.num_q_heads, dec.num_kv_heads, post["inter"]) == (4, 2, 96)
    assert [p.data_ptr() for p in model.parameters()] == before


def test_partial_rotary_compiled_gives_the_same_tokens():
    """torch.compile of the layer functions (the CUDA default) on the partial-rotary branch."""
    model = build("phi3_partial")
    aligned, lengths = left_align(*prompts()[:2])
    eager, _ = FastDecoder(model, Dense(), batch=3, max_len=48, compile=False).generate(aligned, lengths, 4)
    compiled, _ = FastDecoder(model, Dense(), batch=3, max_len=48, compile=True).generate(aligned, lengths, 4)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("arch, window", [("mistral", 8), ("phi3", 8)])
def test_one_window_on_every_layer(arch, window):
    """Mistral's / Phi-3's `sliding_window` applies to every layer: shorter than the cache, every
    layer is a dense ring (exactly HF's tokens) and a sparse method, which would run nowhere, is
    refused; a window that never cuts leaves full attention, where the method runs."""
    model = build(arch)
    model.config.sliding_window = window
    ids, mask, _ = prompts()
    expected = greedy(model, ids, mask, n=N)
    dec = FastDecoder(model, Dense(), batch=3, max_len=48, prefill_chunk=16)
    assert all(isinstance(c, WindowCache) and c.key.shape[2] == window for c in dec.cache)
    assert torch.equal(dec.generate(*left_align(ids, mask), N)[0], expected)
    with pytest.raises(ValueError, match=rf"every layer of {type(model).__name__} \((llama|phi3)\) attends within "
                                         rf"a sliding window \({window}\) shorter than max_len=48.*sparq would "
                                         r"run on none"):
        FastDecoder(model, TIGHT, batch=3, max_len=48)
    with pytest.raises(ValueError, match="sparq would run on none"):
        dec.use(TIGHT)
    model.config.sliding_window = 48  # never cuts at max_len 48: full attention, SparQ runs
    dec = FastDecoder(model, EVERY, batch=3, max_len=48)
    assert not any(isinstance(c, WindowCache) for c in dec.cache)
    assert torch.equal(dec.generate(*left_align(ids, mask), N)[0], greedy(model, ids, mask, n=N))


def test_qwen2_sliding_layers_stay_dense():
    """Qwen2 with use_sliding_window: layers from max_window_layers on slide (transformers'
    layer_types); they stay dense rings (as on the HF path), the others run SparQ: the same tokens
    as HF's SparQ generation, and at full k as HF's dense."""
    torch.manual_seed(0)
    model = random_norms(tf.Qwen2ForCausalLM(tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                                            use_sliding_window=True, sliding_window=8,
                                                            max_window_layers=1, **COMMON)))
    model.generation_config.pad_token_id = 0
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids, mask, _ = prompts()
    dense = greedy(model, ids, mask, n=N)
    with sparq.enabled(model, TIGHT):
        sparse = greedy(model, ids, mask, n=N)
    dec = FastDecoder(model, TIGHT, batch=3, max_len=48, prefill_chunk=16)
    assert [type(c).__name__ for c in dec.cache] == ["KernelCacheLayer", "WindowCache"]
    assert torch.equal(dec.generate(*left_align(ids, mask), N)[0], sparse)
    assert torch.equal(fast_generate(model, ids, mask, EVERY, N)[0], dense)


def test_gemma2_runs_dense_only():
    """Every Gemma 2 layer soft-caps its attention logits, which no decode method implements: the
    loop runs Dense() (soft-capped, exact to HF; the cap matters here) and refuses any other method
    before it touches the model's weights."""
    model = build("gemma2")
    ids, mask, _ = prompts()
    attn = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM \(gemma2\) soft-caps its attention logits "
                                         r"\(attn_logit_softcapping=3\).*sparq does not implement.*Dense\(\) only"):
        fast_generate(model, ids, mask, TIGHT, N)
    assert attn.k_proj.weight.untyped_storage().data_ptr() != attn.q_proj.weight.untyped_storage().data_ptr()
    dec = FastDecoder(model, Dense(), batch=3, max_len=64, prefill_chunk=16)
    assert [type(c).__name__ for c in dec.cache] == ["WindowCache", "KernelCacheLayer", "KernelCacheLayer"]
    with pytest.raises(ValueError, match="soft-caps"):
        dec.use(TIGHT)
    expected = greedy(model, ids, mask, n=12)
    assert torch.equal(dec.generate(*left_align(ids, mask), 12)[0], expected)
    model.config.attn_logit_softcapping = None  # the same model uncapped decodes differently
    uncapped, _ = FastDecoder(model, Dense(), batch=3, max_len=64).generate(*left_align(ids, mask), 12)
    assert not torch.equal(uncapped, expected)


@pytest.mark.parametrize("arch", ["gpt2", "gptneox"])
def test_other_models_are_refused_before_any_work(arch):
    model = tiny(arch)
    before = [p.data_ptr() for p in model.parameters()]
    names = "llama: llama, mistral, qwen2, qwen3; phi3: phi3; gemma2: gemma2; gemma3: gemma3_text"
    with pytest.raises(ValueError, match=f"no model family for {type(model).__name__} .*{names}"):
        fast_generate(model, *prompts()[:2], Dense(), N)
    assert [p.data_ptr() for p in model.parameters()] == before


@pytest.mark.parametrize("mask_shape", [(2, 1, 3, 9), (3, 9)])
def test_softcapped_dense_attention_is_the_eager_formula(mask_shape):
    """Grouped-query heads (6 query heads on 2 KV heads), a non-contiguous query as the loop's, a
    per-row or shared mask: tanh(scores / cap) * cap, masked, softmax, @ V, with KV repeated per head."""
    from sparq.fast.attention import dense_attention

    torch.manual_seed(0)
    q = torch.randn(2, 3, 6, 8).transpose(1, 2)  # [B, Hq, L, d], strided as the loop's
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.rand(mask_shape) > 0.3
    mask[..., 0] = True
    scores = q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3
    scores = (torch.tanh(scores / 2.0) * 2.0).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(scores, -1) @ v.repeat_interleave(3, 1)
    torch.testing.assert_close(dense_attention(q, k, v, mask, 0.3, softcap=2.0), expected)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_model_stays_trainable_after_fast_generate(arch):
    """fast_generate runs under inference mode; the fused weights it re-points the model at must still
    be normal tensors (an inference-tensor parameter breaks autograd and later dtype moves)."""
    model = build(arch)
    ids, mask, _ = prompts()
    fast_generate(model, ids, mask, Dense(), 2)
    assert not [n for n, p in model.named_parameters() if p.is_inference()]
    model.to(torch.bfloat16).to(torch.float32)
    model(ids[:1, -8:]).logits.sum().backward()
    assert model.model.layers[0].self_attn.qkv_proj.weight.grad is not None if arch == "phi3" else \
        model.model.layers[0].self_attn.q_proj.weight.grad is not None
