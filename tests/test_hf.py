"""Hugging Face integration on tiny randomly initialised models of six architectures."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sparq
from sparq import SparQCache, SparQConfig
from sparq.methods import DecodeMethod, SparQ

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=512, initializer_range=0.2, pad_token_id=0, eos_token_id=None,
              bos_token_id=None, tie_word_embeddings=False)


def tiny(arch: str) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **COMMON))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(num_attention_heads=4, num_key_value_heads=1,
                                                       sliding_window=None, **COMMON))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                   **COMMON))
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "full_attention"],
                                  **{**COMMON, "num_hidden_layers": 3})
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "gptneox":
        c = {k: v for k, v in COMMON.items() if k not in ("pad_token_id", "tie_word_embeddings")}
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(num_attention_heads=4, rotary_pct=0.5, **c))
    elif arch == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(num_attention_heads=4, num_key_value_heads=2, **COMMON))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                                 bos_token_id=None, eos_token_id=None, pad_token_id=0))
    elif arch == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                                   pad_token_id=0, bos_token_id=None, eos_token_id=None))
    elif arch == "falcon":
        model = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, pad_token_id=0, bos_token_id=None,
                                                     eos_token_id=None))
    elif arch == "gpt_oss":
        model = tf.GptOssForCausalLM(tf.GptOssConfig(
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=512, layer_types=["full_attention"] * 2, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 10000.0},
            **{**COMMON, "intermediate_size": 64}))
        with torch.no_grad():  # random sinks large enough to matter
            for m in model.modules():
                if hasattr(m, "sinks"):
                    m.sinks.normal_(0.0, 2.0)
    else:
        raise KeyError(arch)
    model.generation_config.pad_token_id = 0
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gptneox"]
# Every architecture either works exactly (k >= length equals dense, token for token, with the decode
# path proven to run) or is refused by `enable` with a message naming it.
EXACT = ARCHS + ["phi3", "gpt2"]
REFUSED = {"bloom": "does not go through transformers' attention interface",
           "falcon": "does not go through transformers' attention interface",
           "gpt_oss": "learned attention sinks"}


def prompts(batch: int = 3, longest: int = 40, seed: int = 1):
    """Left-padded random prompts of different lengths: (input_ids, attention_mask, lengths)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [longest - 9 * i for i in range(batch)]
    ids = torch.zeros(batch, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, longest - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, longest - n:] = 1
    return ids, mask, lengths


def greedy(model, ids, mask, n=10, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)[:, ids.shape[1]:]


class Counting(SparQ):
    """SparQ that counts its decode calls, to prove the decode path really ran."""

    def attend(self, x):
        object.__getattribute__(self, "calls").append(x.key.shape[2])
        return super().attend(x)


def counting(config: SparQConfig) -> Counting:
    m = Counting(config)
    object.__setattr__(m, "calls", [])
    return m


@pytest.mark.parametrize("fast_loop", [True, False])
@pytest.mark.parametrize("arch", EXACT)
def test_k_at_least_context_equals_dense(arch, fast_loop):
    """Through the fast loop (fast_loop=True: `generate` hands it llama/mistral/qwen2/qwen3/gemma3
    and falls back for the others) and through transformers' loop over SparQCache."""
    model = tiny(arch)
    ids, mask, _ = prompts()
    dense = greedy(model, ids, mask)
    method = counting(SparQConfig(r=2, k=10_000, local_window=3))
    with sparq.enabled(model, method, fast_loop=fast_loop):
        got = greedy(model, ids, mask)
    assert method.calls, "the SparQ decode path never ran"
    assert torch.equal(got, dense)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_runs_on_a_sparq_cache(arch):
    """generate must keep the SparQCache the hook swaps in (transformers >= 5.24 passes the cache as
    `cache=`, and a cache given as `past_key_values=` next to it would be ignored): otherwise the
    transposed keys and V sums are rebuilt from scratch every step."""
    model = tiny(arch)
    ids, mask, _ = prompts()
    with sparq.enabled(model, SparQConfig(r=4, k=6, local_window=2), fast_loop=False):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    assert isinstance(cache, SparQCache), type(cache).__name__


def test_no_cache_outlives_generate():
    """Once generate returns (without the fast loop, whose decoder keeps its static cache by design),
    nothing of sparq's holds the SparQCache: the model's pre-forward hook keeps it only weakly."""
    import gc

    model = tiny("llama")
    ids, mask, _ = prompts()
    with sparq.enabled(model, SparQConfig(r=4, k=6, local_window=2), fast_loop=False):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, SparQCache)]


@pytest.mark.parametrize("fast_loop", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_each_prompt_alone(arch, fast_loop):
    model = tiny(arch)
    ids, mask, lengths = prompts()
    cfg = SparQConfig(r=4, k=6, local_window=2)
    with sparq.enabled(model, cfg, fast_loop=fast_loop):
        batched = greedy(model, ids, mask, n=8)
        for i, n in enumerate(lengths):
            alone = greedy(model, ids[i:i + 1, -n:], mask[i:i + 1, -n:], n=8)
            assert torch.equal(batched[i], alone[0]), (arch, i)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tight_budget_changes_attention_and_disable_restores(arch):
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    ids, mask, _ = prompts()
    dense_logits = model(ids, attention_mask=mask).logits
    dense_scores = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True).scores
    with sparq.enabled(model, SparQConfig(r=1, k=2, local_window=1)):
        assert model.config._attn_implementation == "sparq"
        # prefill is dense: identical logits
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, dense_logits)
        sparse_scores = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True).scores
    assert not torch.allclose(sparse_scores[1], dense_scores[1]), "decode with k=2 should differ from dense"
    assert model.config._attn_implementation == impl
    assert not sparq.is_enabled(model)
    assert not model._forward_pre_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           output_scores=True, return_dict_in_generate=True).scores
    for a, b in zip(again, dense_scores):
        torch.testing.assert_close(a, b)


def test_gemma3_sliding_layers_stay_dense():
    model = tiny("gemma3")
    sparq.enable(model, SparQConfig(r=2, k=4))
    tagged = [m.layer_idx for m in model.modules() if hasattr(m, "_sparq_method")]
    sparq.disable(model)
    assert tagged == [1, 2]


def test_sampling_matches_dense_when_everything_is_kept():
    model = tiny("qwen3")
    ids, mask, _ = prompts()
    torch.manual_seed(123)
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0, temperature=1.0)
    with sparq.enabled(model, SparQConfig(r=3, k=100_000)):
        torch.manual_seed(123)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(got, dense)


def test_cache_state_tracks_padding_crop_and_reset():
    model = tiny("llama")
    ids, mask, lengths = prompts()
    with sparq.enabled(model, SparQConfig(r=2, k=5, local_window=1), fast_loop=False):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        cache = out.past_key_values
        assert isinstance(cache, SparQCache)
        layer = cache.layers[0]
        state = cache.sparq_layers[0]
        # value_sum is the sum over real tokens only (left padding excluded), in fp32
        valid = state.valid
        assert valid.sum(-1).tolist() == [n + 5 for n in lengths]  # the 6th token is not yet cached
        expected = (layer.values.float() * valid[:, None, :, None]).sum(2)
        torch.testing.assert_close(state.value_sum, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.key_t, layer.keys.transpose(-1, -2))
        # one valid run per row (left padding): per-row starts and lengths for the kernels
        seq = layer.keys.shape[2]
        assert state.lengths.tolist() == [n + 5 for n in lengths]
        assert state.starts.tolist() == [seq - n - 5 for n in lengths] and state.left_padded
        assert state.capacity >= seq  # Kᵀ and the mask grow in place, not by a copy per step
        cache.crop(-3)  # drop the last 3 cached tokens: prompt + 2 generated remain
        assert not cache.sparq_layers
        # Continue after the crop (state rebuilt from K/V + mask): the logits of the 4th decode
        # step must be those generate computed before the crop, with the very same cache content.
        n = ids.shape[1] + 2
        mask3 = torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1)
        positions = mask3.cumsum(-1)[:, -1:] - 1
        step = model(out.sequences[:, n:n + 1], attention_mask=mask3, position_ids=positions,
                     **{sparq.hf.cache_arg(model): cache}).logits[:, -1]
        torch.testing.assert_close(step, out.logits[3], atol=1e-5, rtol=1e-5)
        assert set(cache.sparq_layers) == {0, 1}
        cache.reset()
        assert not cache.sparq_layers


def test_enable_rejects_bad_arguments():
    model = tiny("llama")
    with pytest.raises(TypeError, match="SparQConfig or a DecodeMethod"):
        sparq.enable(model, {"r": 2})
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sparq.enable(torch.nn.Linear(2, 2), SparQConfig(r=1, k=1))
    assert isinstance(SparQ(SparQConfig(r=1, k=1)), DecodeMethod)


def _selection_margins(monkeypatch) -> list[float]:
    """Record, for every call of the reference's step-1 / top-k selection on a batch of one, the
    smallest margin that decided it (r-th vs (r+1)-th |q| weight, k-th vs (k+1)-th candidate score)."""
    from sparq import reference

    margins: list[float] = []
    dims, topk = reference.select_dims, reference.select_topk

    def select_dims(query_groups, r):
        w = query_groups.abs().sum(2).sort(-1, descending=True).values  # [B, Hkv, d]
        if r < w.shape[-1]:
            margins.append(float((w[..., r - 1] - w[..., r]).min()))
        return dims(query_groups, r)

    def select_topk(scores, valid, k, local):
        n, n_top = int(valid[0].sum()), int(k[0]) - int(local[0])
        cand = scores[0][:, valid[0]][:, : n - int(local[0])].sort(-1, descending=True).values  # [Hkv, n - local]
        if 0 < n_top < cand.shape[-1]:
            margins.append(float((cand[:, n_top - 1] - cand[:, n_top]).min()))
        return topk(scores, valid, k, local)

    monkeypatch.setattr(reference, "select_dims", select_dims)
    monkeypatch.setattr(reference, "select_topk", select_topk)
    return margins


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_alone_fresh_seed(arch, monkeypatch):
    """Fresh prompts and odd budgets (tiny models often generate the zero-embedding pad token,
    whose zero query ties every score: the selection must not depend on where padding sits).

    A batch's matmuls round differently from a batch of one (~1e-6 here), so a selection decided by
    a margin below that can differ without any padding bug (seen: gptneox, whose non-rotary dims give
    a repeated token the same approximate score at both places). Such a row passes only if its own
    run had a selection margin below 1e-4 up to the first differing token (as benchmarks/gpu_fuzz.py
    counts near-ties); every other row must match exactly."""
    seed = torch.seed() % 2**31
    model = tiny(arch)
    ids, mask, lengths = prompts(batch=4, longest=37, seed=seed)
    n_new = 6
    with sparq.enabled(model, SparQConfig(r=3, k=7, local_window=2), fast_loop=False):
        batched = greedy(model, ids, mask, n=n_new)
        margins = _selection_margins(monkeypatch)
        exact = 0
        for i, n in enumerate(lengths):
            margins.clear()
            alone = greedy(model, ids[i:i + 1, -n:], mask[i:i + 1, -n:], n=n_new)
            if torch.equal(batched[i], alone[0]):
                exact += 1
                continue
            first = int((batched[i] != alone[0]).nonzero()[0])  # token `first` came from decode step first - 1
            per_step = len(margins) // (n_new - 1)
            decided = margins[: first * per_step]
            assert decided and min(decided) < 1e-4, (arch, i, f"seed {seed}", first, min(decided, default=None))
    assert exact >= len(lengths) - 1, (arch, f"seed {seed}: more than one row differs")


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_unsupported_architectures_are_refused(arch, monkeypatch):
    """enable refuses, naming the architecture and why; and the refusal is needed: with the check
    bypassed, SparQ never runs on Bloom and Falcon (a silent no-op), and on GPT-OSS its output
    differs from dense even with k >= length (the sinks reach our attention and are ignored)."""
    model = tiny(arch)
    method = counting(SparQConfig(r=64, k=10_000))
    with pytest.raises(ValueError, match=REFUSED[arch]) as err:
        sparq.enable(model, method)
    assert type(model).__name__ in str(err.value) and arch in str(err.value)
    assert not sparq.is_enabled(model) and model.config._attn_implementation != "sparq"

    ids, mask, _ = prompts(batch=1)
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                           return_dict_in_generate=True).logits
    monkeypatch.setattr(sparq.hf, "check_supported", lambda *a, **k: None)
    with sparq.enabled(model, method):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True).logits
    if arch == "gpt_oss":
        assert method.calls and not torch.allclose(got[1], dense[1], atol=1e-4)
    else:
        assert not method.calls


def test_enable_refuses_a_config_made_for_another_head_dim():
    model = tiny("llama")  # head_dim 16
    with pytest.raises(ValueError, match="made for head_dim 128.*head_dim 16"):
        sparq.enable(model, SparQConfig.from_compression(8, head_dim=128))
    assert not sparq.is_enabled(model)
    sparq.enable(model, SparQConfig.from_compression(8, head_dim=16))
    sparq.disable(model)
    # a hand-made config has no head size: r above the model's means every dimension (documented)
    ids, mask, _ = prompts()
    dense = greedy(model, ids, mask, n=4)
    with sparq.enabled(model, SparQConfig(r=128, k=10_000)):
        assert torch.equal(greedy(model, ids, mask, n=4), dense)


ATTN_IMPL_SCRIPT = """
import sys, warnings
import sparq
assert "torch" not in sys.modules and "transformers" not in sys.modules
import torch, transformers as tf
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
tf.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
model = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="sparq").eval()
assert model.config._attn_implementation == "sparq"
ids = torch.randint(1, 96, (1, 150), generator=torch.Generator().manual_seed(1))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
assert any("default" in str(x.message) for x in w), [str(x.message) for x in w]
from sparq.methods import default_method
default = default_method(1 / 8, 16)  # sparq-sketch:local=0:realloc=0 at 1/8
tags = [m._sparq_method for m in model.modules() if hasattr(m, "_sparq_method")]
assert len(tags) == 2 and all(t == default for t in tags), tags
plain = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with sparq.enabled(plain, default):
    want = plain.generate(ids, max_new_tokens=6, do_sample=False)
assert torch.equal(out, want), (out, want)
print("OK")
"""


def test_attn_implementation_sparq_after_plain_import(tmp_path):
    """`import sparq` (which loads neither torch nor transformers) then
    from_pretrained(attn_implementation="sparq"): the model runs the default method at 1/8
    (`sparq.methods.default_method`), exactly as `sparq.enabled(model, default_method(1/8, d))` does."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(__import__("pathlib").Path(sparq.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           # the PyTorch path, as on a GPU machine (CPU tensors): the interpreted sketch kernels took
           # ~10 s of this test and are not what it checks
           "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", ATTN_IMPL_SCRIPT, str(tmp_path / "m")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_gemma2_soft_capping_is_refused():
    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                 sliding_window=8, **COMMON)).eval()
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM \(gemma2\): attention logit soft-capping"):
        sparq.enable(model, SparQConfig(r=2, k=4))
    assert not sparq.is_enabled(model)
