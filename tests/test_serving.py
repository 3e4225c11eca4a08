"""SparQ inside transformers' continuous batching ("paged|sparq", `sparq.serving`) on a tiny random Llama.

The continuous-batching tests need transformers 5.17 or 5.18 (`serving.SUPPORTED_VERSIONS`); on other
versions they are skipped with the reason, and the version check itself is tested. To run them next
to a newer transformers, put an unpacked 5.17/5.18 wheel first on PYTHONPATH (docs/SERVING.md).
"""

from __future__ import annotations

import time

import pytest
import torch
import transformers as tf

import sparq
from sparq import SparQConfig, serving
from sparq.methods import H2O, SparQ, build_method

from test_hf import counting, tiny

needs_cb = pytest.mark.skipif(not serving.cb_supported(),
                              reason=f"continuous batching with 'paged|sparq' needs transformers "
                                     f"{'/'.join(serving.SUPPORTED_VERSIONS)}, found {tf.__version__}")
NEW = 12


def prompts(lengths=(40, 31, 22, 70, 5, 53), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]


def gen_config(new: int = NEW) -> tf.GenerationConfig:
    return tf.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)


def cb_config() -> object:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # small blocks and a small token budget per step: chunked prefill and batches that mix prefill
    # chunks with decode tokens, and requests that wait for room
    return ContinuousBatchingConfig(block_size=16, num_blocks=48, max_batch_tokens=48)


def run_batch(model, inputs, new: int = NEW) -> list[list[int]]:
    out = model.generate_batch(inputs, generation_config=gen_config(new), continuous_batching_config=cb_config())
    assert len(out) == len(inputs), "some requests did not finish"
    return [r.generated_tokens for r in out.values()]


def dense_batch(model, inputs, new: int = NEW) -> list[list[int]]:
    impl = model.config._attn_implementation
    model.set_attn_implementation("paged|sdpa")
    try:
        return run_batch(model, inputs, new)
    finally:
        model.set_attn_implementation(impl)


@pytest.fixture
def plans(monkeypatch):
    """Every batch the paged function saw, as (new tokens, keys) per request: proves what ran."""
    seen: list[list[tuple[int, int]]] = []
    real = serving._plan

    def spy(cu_q, cu_k, *a):
        fresh = not (serving._LAST_PLAN and serving._LAST_PLAN[0].cu_q is cu_q)
        p = real(cu_q, cu_k, *a)
        if fresh:
            bq, bk = cu_q.tolist(), cu_k.tolist()
            seen.append([(bq[i + 1] - bq[i], bk[i + 1] - bk[i]) for i in range(len(bq) - 1)])
        return p

    monkeypatch.setattr(serving, "_plan", spy)
    return seen


@pytest.mark.parametrize("groups", [1, 3])
def test_prefill_attention_over_own_keys(groups):
    """`_own_keys_attention`: each prefill request's query attends causally to its own keys only (the
    semantics of transformers' packed [Q, K] mask), for a chunk that continues a cached prefix, a whole
    prompt, beside decode rows and padding tokens (both left zero)."""
    class Module:
        num_key_value_groups = groups

    hkv, d = 2, 16
    gen = torch.Generator().manual_seed(0)
    # (new tokens, keys) per request: a chunk after a 9-token prefix, decode tokens, a whole prompt
    reqs = [(6, 15), (1, 12), (5, 5), (1, 1), (3, 4), (2, 2)]
    bq, bk = [0], [0]
    for n_q, n_k in reqs:
        bq.append(bq[-1] + n_q)
        bk.append(bk[-1] + n_k)
    q_len = bq[-1] + 3  # 3 padding tokens
    query = torch.randn(1, hkv * groups, q_len, d, generator=gen)
    key = torch.randn(bk[-1], hkv, d, generator=gen)
    value = torch.randn(bk[-1], hkv, d, generator=gen)
    plan = serving._plan(torch.tensor(bq), torch.tensor(bk), bk[-1], torch.device("cpu"))
    assert plan.prefill and plan.rows == [1, 3]
    out = serving._own_keys_attention(Module(), query, key, value, plan, 0.0, None)
    assert out.shape == (1, q_len, hkv * groups, d)
    k = key.repeat_interleave(groups, 1)  # [K, Hq, d]
    v = value.repeat_interleave(groups, 1)
    for r, (n_q, n_k) in enumerate(reqs):
        for i in range(n_q):
            if n_q == 1:  # a decode request: its row is the decode path's
                assert out[0, bq[r]].abs().sum() == 0
                continue
            seen = n_k - n_q + i + 1  # its position among the request's keys, plus one
            kk, vv = k[bk[r]: bk[r] + seen], v[bk[r]: bk[r] + seen]
            att = torch.softmax(torch.einsum("hd,khd->hk", query[0, :, bq[r] + i], kk) / d**0.5, -1)
            torch.testing.assert_close(out[0, bq[r] + i], torch.einsum("hk,khd->hd", att, vv), atol=1e-5, rtol=1e-5)
    assert out[0, bq[-1]:].abs().sum() == 0


@pytest.mark.parametrize("seed", range(6))
def test_prefill_attention_over_own_keys_random_layouts(seed):
    """`_own_keys_attention` on fresh random batches over the space CB produces: 1-6 requests mixing
    decode tokens, whole prompts (one token included) and chunks after cached keys, padding, every
    supported head_dim, GQA ratios 1-8; each row against an explicit softmax over its own visible keys."""
    gen = torch.Generator().manual_seed(100 + seed)
    d = [16, 32, 64, 80, 96, 128, 256][int(torch.randint(0, 7, (1,), generator=gen))]
    hkv = int(torch.randint(1, 4, (1,), generator=gen))
    groups = [1, 2, 3, 4, 8][int(torch.randint(0, 5, (1,), generator=gen))]

    class Module:
        num_key_value_groups = groups

    reqs = []
    for _ in range(int(torch.randint(1, 7, (1,), generator=gen))):
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        n_k = int(torch.randint(1, 40, (1,), generator=gen))
        n_q = 1 if kind == 0 else n_k if kind == 1 else int(torch.randint(1, n_k + 1, (1,), generator=gen))
        reqs.append((n_q, n_k))
    bq, bk = [0], [0]
    for n_q, n_k in reqs:
        bq.append(bq[-1] + n_q)
        bk.append(bk[-1] + n_k)
    q_len = bq[-1] + int(torch.randint(0, 4, (1,), generator=gen))  # padding tokens
    query = torch.randn(1, hkv * groups, q_len, d, generator=gen)
    key = torch.randn(bk[-1], hkv, d, generator=gen)
    value = torch.randn(bk[-1], hkv, d, generator=gen)
    plan = serving._plan(torch.tensor(bq), torch.tensor(bk), bk[-1], torch.device("cpu"))
    out = serving._own_keys_attention(Module(), query, key, value, plan, 0.0, None)
    k = key.repeat_interleave(groups, 1)
    v = value.repeat_interleave(groups, 1)
    for r, (n_q, n_k) in enumerate(reqs):
        for i in range(n_q):
            if n_q == 1:  # one new token: a decode request, left to the decode path
                assert out[0, bq[r]].abs().sum() == 0
                continue
            seen = n_k - n_q + i + 1
            kk, vv = k[bk[r]: bk[r] + seen], v[bk[r]: bk[r] + seen]
            att = torch.softmax(torch.einsum("hd,khd->hk", query[0, :, bq[r] + i], kk) / d**0.5, -1)
            torch.testing.assert_close(out[0, bq[r] + i], torch.einsum("hk,khd->hd", att, vv), atol=2e-5, rtol=2e-5)
    assert out[0, bq[-1]:].abs().sum() == 0


@needs_cb
def test_no_paged_cache_outlives_its_run():
    """After generate_batch returns, nothing of sparq's keeps transformers' paged cache alive (the model's
    pre-forward hook held the last pass's cache: in `sparq bench serve` the previous run's 16 GiB cache
    was still allocated when the next run made its own)."""
    import gc

    from transformers.generation.continuous_batching import PagedAttentionCache

    model = tiny("llama")
    with sparq.enabled(model, build_method(KEPT_SKETCH, "1/8", 16)):
        run_batch(model, prompts((40, 22)))
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, PagedAttentionCache)]


@needs_cb
def test_k_at_least_length_equals_dense_cb_and_generate(plans):
    model = tiny("llama")
    inputs = prompts()
    dense = dense_batch(model, inputs)
    alone = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
             for p in inputs]
    assert dense == alone  # transformers' own CB equals plain generate here, so the comparison means something
    method = counting(SparQConfig(r=2, k=10_000, local_window=3))
    with sparq.enabled(model, method):
        got = run_batch(model, inputs)
    assert got == dense
    assert method.calls, "the SparQ decode path never ran"
    assert any(any(q == 1 for q, _ in b) and any(q > 1 for q, _ in b) for b in plans), "no mixed prefill+decode batch"
    assert any(q > 1 and k > q for b in plans for q, k in b), "no chunked prefill (a chunk reading earlier pages)"


@needs_cb
def test_default_method_and_paper_method_keep_everything_equal_dense():
    model = tiny("llama")
    inputs = prompts()
    dense = dense_batch(model, inputs)
    for method in (build_method("default:min_k=1000", "1/8", 16), build_method("sparq:min_k=1000", "1/8", 16)):
        with sparq.enabled(model, method):
            assert run_batch(model, inputs) == dense, method.label


@needs_cb
def test_tight_budget_runs_and_differs_from_dense():
    model = tiny("llama")
    inputs = prompts()
    dense = dense_batch(model, inputs)
    for method in (SparQ(SparQConfig(r=4, k=4, local_window=1)), build_method("default:min_k=4", "1/8", 16)):
        with sparq.enabled(model, method):
            got = run_batch(model, inputs)
        assert [len(t) for t in got] == [NEW] * len(inputs)
        assert got != dense, f"{method.label} read fewer rows but changed no token"
        # the prefill stays dense, so every request's first token (from the prefill's logits) is dense's
        assert [t[0] for t in got] == [t[0] for t in dense]


@needs_cb
def test_tight_budget_batch_equals_each_request_alone():
    """Per request, SparQ in a continuous batch does what it does alone (rows never mix)."""
    model = tiny("llama")
    inputs = prompts()[:4]
    method = SparQ(SparQConfig(r=4, k=6, local_window=2))
    with sparq.enabled(model, method):
        together = run_batch(model, inputs)
        alone = [run_batch(model, [p])[0] for p in inputs]
    assert together == alone


@needs_cb
def test_request_joining_late_gets_the_tokens_it_gets_alone(plans):
    model = tiny("llama")
    long_run, short_run, late = prompts((30, 25, 44), seed=3)
    method = SparQ(SparQConfig(r=4, k=6, local_window=2))
    with sparq.enabled(model, method):
        alone_late = run_batch(model, [late])[0]
        alone_long = run_batch(model, [long_run], new=60)[0]
        plans.clear()
        manager = model.init_continuous_batching(generation_config=gen_config(), continuous_batching_config=cb_config())
        manager.start()
        try:
            manager.add_request(long_run, request_id="long", max_new_tokens=60)
            manager.add_request(short_run, request_id="short", max_new_tokens=3)
            results = {}
            deadline = time.time() + 60
            while "short" not in results and time.time() < deadline:
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
            assert "long" not in results, "the long request finished before the late one could join"
            manager.add_request(late, request_id="late", max_new_tokens=NEW)
            while len(results) < 3 and time.time() < deadline:
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
        finally:
            manager.stop(block=True, timeout=10)
    assert results["late"].generated_tokens == alone_late
    assert results["long"].generated_tokens == alone_long
    joined = [b for b in plans if len(b) >= 2 and any(q == 1 for q, _ in b) and any(q > 1 and q == k for q, k in b)]
    assert joined, "the late request's prefill never ran beside a decoding request"


@pytest.fixture
def sketch_writes(monkeypatch):
    """Finished sketch blocks written into the kept paged sketch (all layers), as a list of counts."""
    from sparq.caches.paged import PagedSketch

    seen: list[int] = []
    real = PagedSketch.write_blocks

    def spy(self, keys, slots):
        seen.append(keys.shape[0])
        return real(self, keys, slots)

    monkeypatch.setattr(PagedSketch, "write_blocks", spy)
    return seen


# 2-bit sketch in 8-token blocks (the cache's 16-token blocks hold two), a tight budget
KEPT_SKETCH = "sparq-sketch:local=0:realloc=0:block=8:min_k=4"


@needs_cb
@pytest.mark.parametrize("spec", ["sparq", KEPT_SKETCH])
def test_prefix_sharing_reads_shared_blocks_and_gives_the_tokens_alone(spec, plans, sketch_writes):
    model = tiny("llama")
    shared = prompts((48,), seed=5)[0]  # three full 16-token blocks
    first, second = shared + [7, 8, 9], shared + [11, 12]
    method = (SparQ(SparQConfig(r=4, k=6, local_window=2)) if spec == "sparq"
              else build_method(spec, "1/8", 16))
    with sparq.enabled(model, method):
        alone = run_batch(model, [second])[0]
        manager = model.init_continuous_batching(generation_config=gen_config(), continuous_batching_config=cb_config())
        manager.start()
        try:
            manager.add_request(first, request_id="first", max_new_tokens=NEW)
            r = None
            while r is None or not r.is_finished():
                r = manager.get_result(request_id="first", timeout=5)
            plans.clear()
            sketch_writes.clear()
            manager.add_request(second, request_id="second", max_new_tokens=NEW)
            r = None
            while r is None or not r.is_finished():
                r = manager.get_result(request_id="second", timeout=5)
        finally:
            manager.stop(block=True, timeout=10)
    assert r.generated_tokens == alone
    first_batch = plans[0]
    assert len(first_batch) == 1 and first_batch[0][1] - first_batch[0][0] >= 32, (
        f"the second request's prefill did not start from shared blocks: {first_batch}")
    if spec != "sparq":  # 50 + 12 tokens: only sketch block 6 (positions 48-55) is new, in each of 2 layers;
        # the shared blocks' sketch (blocks 0-5, written by the first request) is read, not rewritten
        assert sum(sketch_writes) == 2, sketch_writes


@needs_cb
@pytest.mark.parametrize("spec", [KEPT_SKETCH, "sparq-sketch:local=0:realloc=0:block=16:min_k=2"],
                         ids=["pytorch-route", "kernels-route"])
def test_forked_sequences_share_their_parents_tokens(monkeypatch, spec):
    """num_return_sequences=2: transformers prefills a prompt but its last token, forks the request
    (the child references the finished cache blocks and gets a copy of the partial last one, a copy
    this function never sees) and runs the last token of each. Greedy, every child gets its parent's
    tokens; the kept sketch gives the tokens of the sketch derived from the keys every step (the
    copied block is sketched when it finishes, like any other); at k >= length everything equals
    dense's forks. (At 1/8 the tokens differ from an unforked run's: the prompt's last token runs as
    a one-token step, which SparQ treats as a decode step.)"""
    from sparq import kernels as triton_kernels

    kernels = "block=16" in spec  # the interpreter's kernels are slow: fewer steps, and the k >= length
    if kernels and not triton_kernels.available(torch.device("cpu")):
        pytest.skip("Triton kernels unavailable (set TRITON_INTERPRET=1 on the CPU)")
    model = tiny("llama")
    inputs = prompts((40, 22) if kernels else (40, 22, 53))  # check runs on the PyTorch route only
    gen = gen_config(4 if kernels else 6)
    gen.num_return_sequences = 2  # set after construction: GenerationConfig refuses it for greedy, CB forks

    def every_sequence() -> dict[str, list[int]]:
        # the manager, not generate_batch: 5.17's generate_batch returns only the submitted requests' results
        # (its children finish, but it drops them when it orders the results; 5.18 returns them)
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config())
        manager.start()
        out: dict = {}
        try:
            manager.add_requests(inputs=inputs, max_new_tokens=gen.max_new_tokens)
            deadline = time.monotonic() + 600
            while len(out) < 2 * len(inputs) and time.monotonic() < deadline:
                r = manager.get_result(timeout=1)
                if r is None and not manager.is_running():  # the generation thread ended early
                    break
                if r is not None and r.is_finished():
                    out[r.request_id] = r
        finally:
            manager.stop(block=True)
        assert len(out) == 2 * len(inputs) and all(r.error is None for r in out.values()), \
            "some sequences did not finish"
        return {rid: r.generated_tokens for rid, r in out.items()}

    def forked(budget: str, keep: bool = True) -> dict[str, list[int]]:
        monkeypatch.setattr(serving, "KEEP_SKETCH", keep)
        with sparq.enabled(model, build_method(spec, budget, 16)):
            return every_sequence()

    before = serving.DECODE_CALLS["kernels"]
    kept = forked("1/8")
    assert (serving.DECODE_CALLS["kernels"] > before) == kernels, "the decode route is not the one named"
    children = [rid for rid in kept if "__child" in rid]
    assert len(children) == len(inputs)
    for rid in children:
        assert kept[rid] == kept[rid.split("__child")[0]], rid
    assert kept == forked("1/8", keep=False)
    if kernels:
        return
    impl = model.config._attn_implementation
    model.set_attn_implementation("paged|sdpa")
    try:
        dense = every_sequence()
    finally:
        model.set_attn_implementation(impl)
    assert forked("1") == dense
    assert kept != dense


@needs_cb
def test_kept_paged_sketch_gives_the_tokens_of_the_sketch_from_keys(monkeypatch, sketch_writes):
    """The default method's sketch kept per page (written once per finished block, read through the
    pages) is `key_sketch` value for value: same tokens as deriving it from the keys every step, at a
    budget tight enough to change tokens."""
    model = tiny("llama")
    inputs = prompts()
    method = build_method(KEPT_SKETCH, "1/8", 16)
    with sparq.enabled(model, method):
        kept = run_batch(model, inputs)
        written = sum(sketch_writes)
        monkeypatch.setattr(serving, "KEEP_SKETCH", False)
        sketch_writes.clear()
        derived = run_batch(model, inputs)
    # every finished 8-token block of every request, once, in each of the 2 layers
    assert written == 2 * sum((len(p) + NEW - 1) // 8 for p in inputs) and not sketch_writes
    assert kept == derived
    assert kept != dense_batch(model, inputs)


def test_sketch_is_kept_only_where_it_can_be_exact():
    """A sketch block that straddles two non-adjacent pages, or block sharing off (forks would copy
    finished blocks without their sketch): the sketch is derived from the keys, with a warning."""
    class FakeCache:  # what _kept_sketch reads of transformers' paged cache (weakly referenced)
        def __init__(self, sharing: bool) -> None:
            self.allow_block_sharing = sharing

    method = build_method(KEPT_SKETCH, "1/8", 16)
    key = torch.randn(20, 2, 16)
    bq, bk = [0, 20], [0, 20]  # one request, a 20-token prefill: blocks 0 and 1 finish
    plan = serving._Plan(cu_q=torch.tensor(bq), cu_k=torch.tensor(bk), total_k=20, prefill=True,
                         rows=[], q_pos=torch.zeros(0, dtype=torch.long), k_start=[], lengths=[], bounds=(bq, bk))
    adjacent = torch.arange(96, 116)
    split = torch.cat([torch.arange(96, 108), torch.arange(304, 312)])  # block 1 = slots 104-107, 304-307
    shifted = torch.arange(100, 120)  # contiguous, but blocks do not start at multiples of 8
    cache = FakeCache(True)
    sk, slots = serving._kept_sketch(cache, 0, method, key, plan, {"read_index": [adjacent], "write_index": [adjacent]})
    assert sk is not None and sk.written == 2 and torch.equal(slots, adjacent)
    for c, index, why in ((cache, split, "not contiguous"), (cache, shifted, "not aligned"),
                          (FakeCache(False), adjacent, "block sharing is off")):
        plan.finished.clear()
        serving._warned_sketch.clear()
        with pytest.warns(UserWarning, match=why):
            assert serving._kept_sketch(c, 1, method, key, plan, {"read_index": [index], "write_index": [index]}) \
                == (None, None)


def test_kept_sketch_checks_known_blocks_only_when_tainted():
    """The kept sketch skips its per-layer `known` check (a host sync) only where every finished block
    was sketched when it finished: made in a step whose requests all start there, and never passed
    keys it did not sketch. Made in a step where a request has earlier keys, or after a step of a
    method that keeps no sketch, it checks (and a block that is unknown sends the call to the
    PyTorch route). Sized from the cache's pages (5.18 `get_cache_for_block_table`), it never grows."""
    from sparq.caches.paged import PagedSketch

    class FakeCache:
        allow_block_sharing = True

        def __init__(self, slots: int) -> None:
            self.k = torch.zeros(slots // 16, 16, 2, 16)

        def get_cache_for_block_table(self, layer_idx):
            return 0, self.k, self.k

    method = build_method(KEPT_SKETCH, "1/8", 16)
    key = torch.randn(20, 2, 16)
    index = torch.arange(96, 116)

    def plan_of(bq, bk):
        return serving._Plan(cu_q=torch.tensor(bq), cu_k=torch.tensor(bk), total_k=bk[-1], prefill=bq[-1] > 1,
                             rows=[], q_pos=torch.zeros(0, dtype=torch.long), k_start=[], lengths=[],
                             bounds=(bq, bk))

    cache = FakeCache(256)
    fresh = plan_of([0, 20], [0, 20])  # one request's first 20 tokens
    sk, _ = serving._kept_sketch(cache, 0, method, key, fresh, {"read_index": [index], "write_index": [index]})
    assert sk is not None and not sk.tainted and sk.fixed and sk.codes.shape[0] == 256 and sk.written == 2
    with pytest.raises(ValueError, match="outside"):
        sk.reserve(257)
    late = plan_of([0, 1], [0, 20])  # a decode request with 19 earlier keys: made now, it never saw them
    sk1, _ = serving._kept_sketch(cache, 1, method, key, late, {"read_index": [index], "write_index": [index[-1:]]})
    assert sk1 is not None and sk1.tainted
    # a step of a method without a sketch on layer 0 writes keys it does not sketch: tainted from then on
    sparq_paper = build_method("sparq", "1/8", 16)
    assert serving._kept_sketch(cache, 0, sparq_paper, key, fresh, {"read_index": [index], "write_index": [index]}) \
        == (None, None)
    assert sk.tainted and not bool(sk.known[96 // 8: 116 // 8].any())
    assert not sk1.known[96 // 8] and sk1.written == 0
    with pytest.raises(ValueError, match="slots"):
        PagedSketch(2, 16, 2, 8, torch.float32, torch.device("cpu"), slots=0)


def test_version_check_names_the_version():
    assert serving.cb_supported("5.17.0") and serving.cb_supported("5.18.0")
    assert not serving.cb_supported("5.19.0") and not serving.cb_supported("5.24.0")
    with pytest.raises(RuntimeError, match="5.24.0"):
        serving.check_version("5.24.0")


def test_paged_function_refuses_bad_use():
    model = tiny("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="only inside transformers' continuous batching"):
        serving.paged_attention_forward(attn, q, kv, kv, None, scaling=0.25)
    with sparq.enabled(model, H2O(0.5)):
        with pytest.raises(ValueError, match="keeps per-request state"):
            serving.paged_attention_forward(attn, q, kv, kv, None, scaling=0.25)
    gemma = tiny("gemma3")
    sliding = gemma.model.layers[0].self_attn
    with pytest.raises(ValueError, match="sliding-window layers"):
        serving.paged_attention_forward(sliding, q, kv, kv, None, scaling=0.25)
    with pytest.raises(ValueError, match="attention sinks"):  # GPT-OSS passes its sinks as s_aux
        serving.paged_attention_forward(attn, q, kv, kv, None, scaling=0.25, s_aux=torch.zeros(4))


@needs_cb
def test_use_paged_switches_the_model():
    model = tiny("llama")
    with sparq.enabled(model, SparQConfig(r=2, k=10_000, local_window=3)):
        serving.use_paged(model)
        assert model.config._attn_implementation == serving.PAGED_ATTN_NAME
        assert run_batch(model, prompts()[:2]) == dense_batch(model, prompts()[:2])
    assert model.config._attn_implementation != serving.PAGED_ATTN_NAME


@needs_cb
def test_bench_serve_smoke(tmp_path):
    """`sparq bench serve` on the CPU: every variant finishes every request; a cache too small for all
    requests at once holds fewer in flight (the same for both: same cache, no extra SparQ state);
    SparQ at k >= length gives dense's tokens."""
    import json

    from sparq.tools.bench_serve import bench_serve, format_serve_table

    kw = dict(requests=6, min_prompt=40, max_prompt=90, new_tokens=6, block_size=16, max_batch_tokens=128,
              device="cpu", out_dir=tmp_path, print_rows=False)
    res = bench_serve("tiny", methods=("dense", "dense-per-request", "sparq:min_k=1000"), cache_gib=0.0001,
                      **kw)  # 13 blocks of 16: ~2 requests
    saved = json.loads(open(res["path"]).read())
    assert saved["settings"]["num_blocks_dense"] == 13 and saved["versions"]["transformers"] == tf.__version__
    dense, own, sq = saved["rows"]
    # dense through "paged|sparq": every decode layer call attends per request, dense's tokens
    assert own["attn_implementation"] == "paged|sparq" and own["decode_calls"]["dense"] > 0
    assert own["decode_calls"]["torch"] == own["decode_calls"]["kernels"] == 0 and own["requests_equal_to_dense"] == 6
    assert sq["decode_calls"]["dense"] == 0 and sq["decode_calls"]["torch"] > 0
    assert sq["best_dense"] in ("dense", "dense-per-request") and sq["throughput_vs_best_dense"] > 0
    for r in (dense, own, sq):
        assert r["requests_finished"] == 6 and r["generated_tokens"] == 36 and r["throughput_tokens_per_s"] > 0
        assert 1 <= r["max_requests_in_flight"] < 6
        assert r["tpot_ms_median"] > 0 and r["tpot_ms_p95"] >= r["tpot_ms_median"]
        # 6 new tokens per request: the first comes from the last prefill pass, 5 decode passes at least
        # (the call's last pass is not counted)
        p = r["passes"]
        assert p["decode_only"]["passes"] >= 4 and p["with_prefill"]["passes"] >= 1, p
        assert p["decode_only"]["median_ms"] > 0 and 0 < p["decode_only"]["total_s"] + p["with_prefill"]["total_s"] <= r["wall_s"]
    assert sq["requests_equal_to_dense"] == 6 and "throughput_vs_dense" in sq
    assert dense["num_blocks"] == sq["num_blocks"] == 13  # the paper's method keeps nothing beside the cache
    assert "tokens/s" in format_serve_table(res)
    with pytest.raises(ValueError, match="max_prompt"):
        bench_serve("tiny", min_prompt=50, max_prompt=40, **{k: v for k, v in kw.items() if k not in
                                                             ("min_prompt", "max_prompt")})
    # the route flags apply to one run only: the module's settings come back afterwards
    before = serving.KERNELS, serving.READ_PAGES
    bench_serve("tiny", methods=("default",), kernels=False, read_pages=False, cache_gib=0.0001,
                **{**kw, "requests": 1})
    assert (serving.KERNELS, serving.READ_PAGES) == before


def test_bench_serve_refuses_bad_route_flags():
    """Checked before anything else (also on transformers versions whose CB cannot run paged|sparq)."""
    from sparq.tools.bench_serve import bench_serve

    with pytest.raises(TypeError, match="kernels must be True, False or None"):
        bench_serve("tiny", kernels="yes", device="cpu", out_dir=None)
    with pytest.raises(TypeError, match="read_pages must be True, False or None"):
        bench_serve("tiny", read_pages=1, device="cpu", out_dir=None)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_paged_sketch_equals_key_sketch_value_for_value(bits):
    """Keys of 3 requests scattered over shuffled 16-token pages, written block by block as they
    finish; read back through the pages, the sketch is `key_sketch` on every valid position."""
    from sparq.caches.paged import PagedSketch
    from sparq.methods.sketch import key_sketch

    torch.manual_seed(0)
    hkv, d, blk, page = 2, 16, 8, 16
    lengths = [5, 37, 64]  # no finished block; 4 finished + a partial one; 8 finished
    s = max(lengths)
    key = torch.randn(3, hkv, s, d).to(torch.bfloat16)
    pages = torch.randperm(20)
    slots = torch.zeros(3, s, dtype=torch.long)
    used = 0
    for b, n in enumerate(lengths):  # each request's pages, in logical order
        for p in range(-(-n // page)):
            slots[b, p * page:(p + 1) * page] = pages[used] * page + torch.arange(page)
            used += 1
    sk = PagedSketch(hkv, d, bits, blk, torch.bfloat16, torch.device("cpu"))
    for b, n in enumerate(lengths):
        for j in range(n // blk):
            sl = slots[b, j * blk:(j + 1) * blk]
            sk.write_blocks(key[b, :, j * blk:(j + 1) * blk].transpose(0, 1)[None], sl[None])
    lens = torch.tensor(lengths)
    valid = torch.arange(s)[None, :] < lens[:, None]
    got = sk.dequantised(key, slots, lens)
    want = key_sketch(key, valid, bits, blk)
    coded = valid & (lens // blk > 0)[:, None]
    assert torch.equal(got[coded[:, None, :, None].expand_as(got)], want[coded[:, None, :, None].expand_as(want)])
    assert torch.isfinite(got).all() and sk.written == sum(n // blk for n in lengths)
    sk.invalidate(slots[2, 9:10])  # a key of request 2's block 1 rewritten without its sketch
    assert sk.dequantised(key, slots, lens) is None  # unknown: the caller derives the sketch from the keys
    assert sk.dequantised(key[:2], slots[:2], lens[:2]) is not None
    with pytest.raises(ValueError, match="head_dim \\* bits"):
        PagedSketch(hkv, 6, 1, blk, torch.bfloat16, torch.device("cpu"))


def test_bench_serve_budgets_the_kept_sketch():
    """Same memory budget: the default method's sketch beside the paged cache costs +7% of the fp16 KV
    bytes at the Llama-3-8B shape, so it gets ~7% fewer blocks; the paper's method keeps nothing."""
    from sparq.tools.bench_generate import SHAPES
    from sparq.fast import kv_bytes_per_token
    from sparq.tools.bench_serve import sketch_bytes_per_token

    cfg = tf.LlamaConfig(**SHAPES["llama3-8b"])
    kv = kv_bytes_per_token(cfg)
    assert kv == 32 * 8 * 128 * 2 * 2
    assert sketch_bytes_per_token(cfg, build_method("default", "1/8", 128), torch.bfloat16) == 32 * 8 * (32 + 4)
    assert sketch_bytes_per_token(cfg, build_method("sparq", "1/8", 128), torch.bfloat16) == 0


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every `serving._decode_kernels` call as (read through the pages, ran), and every read index
    `PagedAttentionCache.update` got, by size (an empty one: transformers gathered nothing)."""
    pytest.importorskip("triton")
    from transformers.generation.continuous_batching import PagedAttentionCache

    from sparq import kernels

    if not kernels.available(torch.device("cpu")):
        pytest.skip("Triton kernels unavailable (set TRITON_INTERPRET=1 on the CPU)")
    calls: dict[str, list] = {"kernels": [], "reads": []}
    real, real_update = serving._decode_kernels, PagedAttentionCache.update

    def spy(*a, **k):
        y = real(*a, **k)
        calls["kernels"].append((k.get("paged", False), y is not None))
        return y

    def spy_update(self, *a, **k):
        calls["reads"].append(k["read_index"][0].numel())
        return real_update(self, *a, **k)

    monkeypatch.setattr(serving, "_decode_kernels", spy)
    monkeypatch.setattr(PagedAttentionCache, "update", spy_update)
    return calls


@needs_cb
def test_kernels_route_gives_the_tokens_of_the_pytorch_route(monkeypatch, kernel_calls):
    """The default method's decode requests on the Triton kernels (the CPU interpreter here) give the
    tokens of the PyTorch route, at a budget tight enough to change tokens (16-token sketch blocks:
    the kernels' smallest), both ways the kernels read K/V: through the pages in decode-only batches
    (`READ_PAGES`, transformers' gather skipped: its `update` reads nothing back) and from
    transformers' packed read (batches with a prefill chunk, and every batch with READ_PAGES off)."""
    model = tiny("llama")
    inputs = prompts((40, 22, 5, 53))
    method = build_method("sparq-sketch:local=0:realloc=0:block=16:min_k=2", "1/8", 16)
    runs = {}
    with sparq.enabled(model, method):
        for name, pages, on in (("pages", True, True), ("packed", False, True), ("torch", True, False)):
            monkeypatch.setattr(serving, "READ_PAGES", pages)
            monkeypatch.setattr(serving, "KERNELS", on)
            kernel_calls["kernels"].clear()
            kernel_calls["reads"].clear()
            runs[name] = run_batch(model, inputs, 8)
            runs[name + " calls"] = list(kernel_calls["kernels"])
            runs[name + " empty reads"] = kernel_calls["reads"].count(0)
    paged = [c for c in runs["pages calls"] if c[0]]
    assert paged and all(ok for _, ok in runs["pages calls"]), runs["pages calls"]
    assert any(not p for p, _ in runs["pages calls"]), "no batch with a prefill chunk on the packed read"
    # each paged call skipped transformers' gather (other empty reads: prefills with nothing cached)
    assert runs["pages empty reads"] == runs["packed empty reads"] + len(paged)
    assert runs["packed calls"] and all(ok and not p for p, ok in runs["packed calls"])
    assert not runs["torch calls"]
    assert runs["pages"] == runs["packed"] == runs["torch"]
    assert runs["pages"] != dense_batch(model, inputs, 8)
    # where the kernels decline after the pages were chosen (an unknown sketch block), the PyTorch
    # route runs on the packed read made then: the same tokens
    monkeypatch.setattr(serving, "READ_PAGES", True)
    monkeypatch.setattr(serving, "KERNELS", True)
    declined: list[bool] = []

    def decline(*a, **k):
        declined.append(k.get("paged", False))
        return None

    monkeypatch.setattr(serving, "_decode_kernels", decline)
    with sparq.enabled(model, method):
        assert run_batch(model, inputs, 8) == runs["torch"]
    assert any(declined)


@needs_cb
def test_kernels_through_the_pages_keeping_everything_equal_dense(monkeypatch, kernel_calls):
    """k >= length (reallocation on: V's sums read through the slots too): dense's tokens, with
    decode-only batches read through the pages."""
    model = tiny("llama")
    inputs = prompts((40, 22, 5, 53))
    dense = dense_batch(model, inputs, 8)
    monkeypatch.setattr(serving, "KERNELS", True)
    monkeypatch.setattr(serving, "READ_PAGES", True)
    with sparq.enabled(model, build_method("sparq-sketch:block=16:min_k=1000", "1/8", 16)):
        assert run_batch(model, inputs, 8) == dense
    assert any(p for p, _ in kernel_calls["kernels"]) and all(ok for _, ok in kernel_calls["kernels"])


@needs_cb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels route on the GPU (fp16)")
def test_kernels_route_on_the_gpu(monkeypatch):
    """The same on CUDA, the tiny Llama in fp16 (where the route runs outside the interpreter): the
    kernels route ran every decode call and gives the PyTorch route's tokens for at least 3 of the 4
    requests (fp16 rounding may flip a near-tie and with it the rest of a request). Reading decode-only
    batches through the pages (`READ_PAGES`, on by default since this passed on the H200) gives the
    packed read's tokens exactly (the same kernels over the same values, deterministic selection)."""
    monkeypatch.setattr(serving, "KERNELS", True)  # the default; set in case a caller turned it off
    monkeypatch.setattr(serving, "READ_PAGES", False)
    model = tiny("llama").to("cuda", torch.float16)
    inputs = prompts((40, 22, 5, 53))
    method = build_method("sparq-sketch:local=0:realloc=0:block=16:min_k=2", "1/8", 16)
    paged: list[bool] = []
    real = serving._decode_kernels

    def spy(*a, **k):
        paged.append(k.get("paged", False))
        return real(*a, **k)

    monkeypatch.setattr(serving, "_decode_kernels", spy)
    with sparq.enabled(model, method):
        serving.use_paged(model)  # where flash attention is installed CB would otherwise swap it in
        before = dict(serving.DECODE_CALLS)
        on_kernels = run_batch(model, inputs, 8)
        assert serving.DECODE_CALLS["kernels"] > before["kernels"] and serving.DECODE_CALLS["torch"] == before["torch"]
        assert paged and not any(paged)
        monkeypatch.setattr(serving, "READ_PAGES", True)
        through_pages = run_batch(model, inputs, 8)
        assert any(paged) and serving.DECODE_CALLS["torch"] == before["torch"]
        monkeypatch.setattr(serving, "KERNELS", False)
        on_torch = run_batch(model, inputs, 8)
    assert through_pages == on_kernels
    assert sum(a == b for a, b in zip(on_kernels, on_torch)) >= 3, (on_kernels, on_torch)


@needs_cb
def test_graph_layout_gives_the_eager_tokens(monkeypatch, kernel_calls):
    """`serving.GRAPHS`' fixed-address layout ("static": the same buffers and step a CUDA graph replays, run
    eagerly; row b's slot map at b * capacity, the step sketch gathered for the plan's whole capacity) gives
    the eager route's tokens, at a budget tight enough to change tokens, with requests joining and leaving
    (batch buckets of 1-4 rows) and requests that outgrow their plan (capacity 32 -> 64: a new bucket); so
    does a bucket whose CUDA graph capture failed (it warns and runs that layout eagerly)."""
    model = tiny("llama")
    inputs = prompts((40, 22, 5, 53))
    method = build_method("sparq-sketch:local=0:realloc=0:block=16:min_k=2", "1/8", 16)
    monkeypatch.setattr(serving, "MIN_CAPACITY", 32)
    monkeypatch.setattr(serving, "KERNELS", True)
    monkeypatch.setattr(serving, "READ_PAGES", True)
    runs, used, buckets = {}, {}, []
    real = serving._decode_kernels

    def spy(*a, **k):  # after each call: the live buckets, each on a plan the route still holds
        y = real(*a, **k)
        route = a[8]
        live = {id(p) for p in route.plans.values()}
        buckets.append((len(route.graphed), all(id(g.dplan) in live for g in route.graphed.values()),
                        all(g.batch == b for b, g in route.graphed.items())))
        return y

    monkeypatch.setattr(serving, "_decode_kernels", spy)
    with sparq.enabled(model, method):
        for mode in (False, "static"):
            monkeypatch.setattr(serving, "GRAPHS", mode)
            before = serving.DECODE_CALLS["graphs"]
            runs[mode] = run_batch(model, inputs, 10)
            used[mode] = serving.DECODE_CALLS["graphs"] - before
        # where capturing fails (forced: on the CPU every capture fails) each bucket warns and runs the same
        # layout eagerly: the same tokens, no failed request
        monkeypatch.setattr(serving, "GRAPHS", True)
        monkeypatch.setattr(serving, "_graphs_mode", lambda *a: "capture")
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
        with pytest.warns(UserWarning, match="capturing the decode step as a CUDA graph failed"):
            runs["failed capture"] = run_batch(model, inputs, 10)
    assert used[False] == 0 and used["static"] > 0
    assert runs["static"] == runs[False] == runs["failed capture"]
    # nothing piles up: at most one bucket per power-of-two batch (1, 2, 4 rows here), none on a dropped plan
    assert buckets and max(n for n, _, _ in buckets) <= 3 and all(ok and keyed for _, ok, keyed in buckets)
    assert runs[False] != dense_batch(model, inputs, 10)


@needs_cb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_give_the_eager_tokens_on_the_gpu(monkeypatch):
    """On CUDA (tiny Llama, fp16): decode-only batches through the pages replay one captured graph per layer
    (`serving.GRAPHS`, on by default) and give the eager launches' tokens exactly (the same kernels over
    the same values), with requests joining and leaving and a plan outgrown mid-run; graphs are captured
    once per layer and bucket and replayed after that."""
    monkeypatch.setattr(serving, "KERNELS", True)
    monkeypatch.setattr(serving, "READ_PAGES", True)
    model = tiny("llama").to("cuda", torch.float16)
    inputs = prompts((40, 22, 5, 126, 53))
    method = build_method("sparq-sketch:local=0:realloc=0:block=16:min_k=2", "1/8", 16)
    runs = {}
    with sparq.enabled(model, method):
        serving.use_paged(model)
        for mode in (False, True):
            monkeypatch.setattr(serving, "GRAPHS", mode)
            before = dict(serving.GRAPH_EVENTS)
            runs[mode] = run_batch(model, inputs, 10)
            runs[(mode, "events")] = {k: serving.GRAPH_EVENTS[k] - before[k] for k in before}
    assert runs[(False, "events")] == {"captured": 0, "replayed": 0}
    ev = runs[(True, "events")]
    assert ev["captured"] > 0 and ev["replayed"] > ev["captured"], ev
    assert runs[True] == runs[False]
    # the only bucket's plan outgrown (capacity 32 -> 64 -> 128) and replaced, with every graph of the old one
    # gone: the new bucket captures into a pool of its own (reusing a dead pool's handle broke an allocator
    # assert in bench serve on the H200)
    monkeypatch.setattr(serving, "MIN_CAPACITY", 32)
    alone = prompts((20,), seed=3)
    with sparq.enabled(model, method):
        for mode in (False, True):
            monkeypatch.setattr(serving, "GRAPHS", mode)
            before = dict(serving.GRAPH_EVENTS)
            runs[("alone", mode)] = run_batch(model, alone, 80)
            runs[("alone", mode, "events")] = {k: serving.GRAPH_EVENTS[k] - before[k] for k in before}
    layers = model.config.num_hidden_layers
    assert runs[("alone", True, "events")]["captured"] >= 3 * layers, runs[("alone", True, "events")]
    assert runs[("alone", True)] == runs[("alone", False)]

