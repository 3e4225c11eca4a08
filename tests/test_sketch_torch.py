"""The sketch kept incrementally in PyTorch (no Triton: CPU without the interpreter, 4/8 bits, other
block sizes), and `SparQSketch.attend`'s PyTorch path scoring from it instead of rebuilding
`key_sketch` over every position at every step.

Every case draws fresh random inputs: ragged, left-padded rows (NaN in the padding), lengths below
one block and crossing block boundaries during the appends, constant channels (a zero quantisation
step), bits 1/2/4/8, several head dims and blocks. The kept path must equal the rebuilt one exactly
(same selection, same output bits), and its codes must equal a prefill of the whole sequence.
"""

from __future__ import annotations

import pytest
import torch

from sparq.methods.base import DecodeInputs
from sparq.methods.sketch import SparQSketch, key_sketch, kept_sketch


def _torch_state(*args, **kw):
    from sparq.kernels.sketch_state import SketchState

    st = SketchState(*args, **kw)
    st.kernels = False  # the PyTorch append and scorer, even where the interpreter could run the kernels
    return st


def _case(seed, batch, hkv, d, block, dtype=torch.float32):
    """K/V buffers [B, Hkv, S, d] with NaN padding, starts, first and final lengths per row (batch
    4): row 0 unpadded and crossing its third block boundary during the appends, row 1 crossing its
    second, row 2 shorter than a block throughout (exact keys), row 3 below one block that
    finishes its first block during the appends."""
    gen = torch.Generator().manual_seed(seed)
    steps = 7
    assert batch == 4 and block > 12

    def before(n_blocks):
        return n_blocks * block - int(torch.randint(1, 6, (), generator=gen))
    first = torch.tensor([before(3), before(2), int(torch.randint(1, 5, (), generator=gen)), before(1)])
    final = first + steps
    starts = torch.randint(0, 9, (batch,), generator=gen)
    starts[0] = 0
    s = int((starts + final).max())
    key = torch.randn(batch, hkv, s, d, generator=gen) * torch.rand(1, hkv, 1, d, generator=gen) * 3
    key[:, :, :, 0] = 0.5  # a constant channel: the quantisation step is 0 there
    key = key.to(dtype)
    value = torch.randn(batch, hkv, s, d, generator=gen).to(dtype)
    pos = torch.arange(s)
    run = (pos[None] >= starts[:, None]) & (pos[None] < (starts + final)[:, None])
    key = key.masked_fill(~run[:, None, :, None], float("nan"))
    value = value.masked_fill(~run[:, None, :, None], float("nan"))
    return gen, key, value, starts, first, final, steps


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("d,block", [(32, 16), (64, 24), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_append_equals_prefill(bits, d, block, dtype):
    """Prefill + one PyTorch append per step gives the codes (bitwise) and ranges (exactly) of a
    prefill of the whole sequence, and `dequantised` is `key_sketch` on the coded rows."""
    batch, hkv = 4, 2
    _, key, _, starts, first, final, steps = _case(10 * bits + d + block, batch, hkv, d, block, dtype)
    cap = key.shape[2] + 5
    a = _torch_state(batch, hkv, d, cap, bits=bits, block=block, dtype=dtype, device="cpu")
    a.prefill(key, first, starts)
    rows = torch.arange(batch)
    lengths = first.clone()
    for _ in range(steps):
        new = key[rows, :, starts + lengths]  # [B, Hkv, d], as if just appended
        a.append(new, key, lengths, starts)
        lengths += 1
    b_ = _torch_state(batch, hkv, d, cap, bits=bits, block=block, dtype=dtype, device="cpu")
    b_.prefill(key, final, starts)
    pos = torch.arange(key.shape[2])
    valid = (pos[None] >= starts[:, None]) & (pos[None] < (starts + final)[:, None])
    ref = key_sketch(key, valid, bits, block)
    deq = a.dequantised(final)
    for i in range(batch):
        n, n_full, s0 = int(final[i]), int(final[i]) // block, int(starts[i])
        if n_full == 0:  # row 2: no codes yet
            continue
        assert torch.equal(a.codes[i, :, :n], b_.codes[i, :, :n]), i
        assert torch.equal(a.lo[i, :, :n_full], b_.lo[i, :, :n_full]), i
        assert torch.equal(a.hi[i, :, :n_full], b_.hi[i, :, :n_full]), i
        assert torch.equal(deq[i, :, :n], ref[i, :, s0:s0 + n]), i


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("d,block", [(32, 16), (64, 24), (64, 128), (128, 16)])
@pytest.mark.parametrize("opts", [dict(), dict(local_fraction=0.0, reallocate=False)])
def test_kept_sketch_attend_equals_rebuilt(bits, d, block, opts):
    """At every decode step (rows below, at and across block boundaries), attend from the kept
    sketch equals attend rebuilding key_sketch from every key: the same output bits."""
    batch, hkv, g = 4, 2, 3
    gen, key, value, starts, first, final, steps = _case(1000 + 10 * bits + d + block, batch, hkv, d, block)
    m = SparQSketch(1 / 8, bits=bits, block=block, **opts)
    st = _torch_state(batch, hkv, d, key.shape[2], bits=bits, block=block, dtype=key.dtype, device="cpu")
    st.prefill(key, first, starts)
    rows = torch.arange(batch)
    lengths = first.clone()
    pos = torch.arange(key.shape[2])
    checked = 0
    for t in range(steps + 1):
        if t:  # append the next position, then decode over it
            st.append(key[rows, :, starts + lengths], key, lengths, starts)
            lengths += 1
        valid = (pos[None] >= starts[:, None]) & (pos[None] < (starts + lengths)[:, None])
        q = torch.randn(batch, hkv * g, d, generator=gen)
        vsum = value.masked_fill(~valid[:, None, :, None], 0.0).sum(2)
        common = dict(query=q, key=key, value=value, valid=valid, scale=d**-0.5, value_sum=vsum)
        kept = DecodeInputs(**common, lengths=lengths.to(torch.int32), starts=starts.to(torch.int32), sketch=st)
        rebuilt = DecodeInputs(**common)
        ks = kept_sketch(kept)
        ref = key_sketch(key, valid, bits, block)
        assert torch.equal(ks.masked_fill(~valid[:, None, :, None], 0.0), ref), t
        assert torch.equal(m.approx_scores(kept), m.approx_scores(rebuilt)), t
        out_kept, out_ref = m.attend(kept), m.attend(rebuilt)
        assert not out_ref.isnan().any()
        assert torch.equal(out_kept, out_ref), t
        checked += 1
    assert checked == steps + 1


def test_unpadded_rows_need_no_starts():
    """starts None (rows from position 0, as the static cache and an unpadded batch hand it over)."""
    batch, hkv, d, block = 2, 1, 64, 16
    gen = torch.Generator().manual_seed(5)
    key = torch.randn(batch, hkv, 70, d, generator=gen)
    value = torch.randn_like(key)
    lengths = torch.tensor([70, 41], dtype=torch.int32)
    valid = torch.arange(70)[None] < lengths[:, None]
    st = _torch_state(batch, hkv, d, 80, bits=2, block=block, dtype=key.dtype, device="cpu")
    st.prefill(key, lengths)
    m = SparQSketch(1 / 8, bits=2, block=block)
    q = torch.randn(batch, 4, d, generator=gen)
    common = dict(query=q, key=key, value=value, valid=valid, scale=0.125)
    assert torch.equal(m.attend(DecodeInputs(**common, lengths=lengths, sketch=st)), m.attend(DecodeInputs(**common)))


def _tiny_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         initializer_range=0.2, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("spec", ["sparq-sketch:block=16", "sparq-sketch:bits=1:block=16:local=0:realloc=0",
                                  "sparq-sketch:bits=4:block=32"])
def test_generate_same_tokens_as_rebuilding(monkeypatch, spec):
    """generate through sparq.enable (SparQCache, a left-padded batch, decode steps crossing block
    boundaries): the PyTorch-kept sketch gives the same tokens as rebuilding the sketch every step
    (what the CPU path did before), and the cache really keeps it."""
    import sparq
    from sparq.kernels import sketch_state
    from sparq.methods import build_method

    monkeypatch.setattr(sketch_state, "sketch_supported", lambda *a, **k: False)  # no kernels, even interpreted
    model = _tiny_llama()
    method = build_method(spec, "1/8", 32)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0

    def run():
        sparq.enable(model, method)
        try:
            cache = sparq.SparQCache(config=model.config)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                 **{sparq.hf.cache_arg(model): cache})
        finally:
            sparq.disable(model)
        return out, cache

    kept, cache = run()
    states = list(cache.sparq_layers.values())
    assert states and all(s.sketch is not None and not s.sketch.kernels for s in states)
    monkeypatch.setattr(sketch_state, "sketch_storable", lambda *a, **k: False)  # no kept sketch: rebuild
    rebuilt, cache2 = run()
    assert all(s.sketch is None for s in cache2.sparq_layers.values())
    assert torch.equal(kept, rebuilt)


def test_fast_loop_same_tokens_as_rebuilding(monkeypatch):
    """The fast loop's static cache keeps the sketch with the same PyTorch append: the same tokens
    as rebuilding it every step."""
    from sparq.fast import FastDecoder
    from sparq.kernels import sketch_state

    monkeypatch.setattr(sketch_state, "sketch_supported", lambda *a, **k: False)
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(4)
    lengths = torch.tensor([40, 27])
    ids = torch.randint(1, 96, (2, 40), generator=gen)
    method = SparQSketch(1 / 8, bits=2, block=16)

    def run():
        dec = FastDecoder(model, method, batch=2, max_len=80, compile=False)
        toks, _ = dec.generate(ids, lengths, 30)
        return toks, dec

    kept, dec = run()
    assert all(c.sketch is not None and not c.sketch.kernels for c in dec._global)
    monkeypatch.setattr(sketch_state, "sketch_storable", lambda *a, **k: False)
    rebuilt, dec2 = run()
    assert all(c.sketch is None for c in dec2._global)
    assert torch.equal(kept, rebuilt)
