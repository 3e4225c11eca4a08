"""`model.generate` under `sparq.enabled` hands greedy/sampled decoding to the fast loop
(`sparq.hf_generate`), keeping generate's contract; everything else falls back, with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import sparq
from sparq import SparQConfig
from sparq.hf_generate import SparQFallbackWarning
from sparq.methods import Dense
from test_hf import greedy, prompts, tiny

TIGHT = SparQConfig(r=4, k=6, local_window=2)
LOOSE = SparQConfig(r=64, k=100_000)  # every position kept: equals dense


def decoder(model):
    return getattr(model, sparq.hf._CTX_ATTR).decoder


@pytest.fixture
def no_fallback():
    """Fail on a fallback warning (the handed-over path must really be taken)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparQFallbackWarning)
        yield


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_greedy_equals_transformers_loop(arch, no_fallback):
    """Same tokens as today's path (transformers' loop over SparQCache) at a tight budget, on a
    left-padded batch; the fast loop really ran."""
    model = tiny(arch)
    ids, mask, _ = prompts()
    dense = greedy(model, ids, mask, n=12)
    with sparq.enabled(model, TIGHT, fast_loop=False):
        expected = greedy(model, ids, mask, n=12)
    with sparq.enabled(model, TIGHT):
        got = greedy(model, ids, mask, n=12)
        assert decoder(model) is not None
    assert torch.equal(got, expected)
    with sparq.enabled(model, LOOSE):
        assert torch.equal(greedy(model, ids, mask, n=12), dense)
    assert not torch.equal(expected, dense), "budget too loose: SparQ should change some tokens here"


def test_no_padding_and_single_row(no_fallback):
    model = tiny("llama")
    ids, mask, lengths = prompts()
    one = ids[:1]  # a full row: generate drops the all-ones mask
    with sparq.enabled(model, TIGHT, fast_loop=False):
        expected = model.generate(one, max_new_tokens=7, do_sample=False)
    with sparq.enabled(model, TIGHT):
        got = model.generate(one, max_new_tokens=7, do_sample=False)
    assert torch.equal(got, expected)


def test_static_cache_request_goes_to_the_fast_loop(no_fallback):
    """cache_implementation="static" under sparq.enabled: the fast loop decodes (its own static cache;
    transformers' StaticCache is never filled, so it never allocates), same tokens as today's path."""
    model = tiny("llama")
    ids, mask, _ = prompts()
    with sparq.enabled(model, TIGHT, fast_loop=False):
        expected = greedy(model, ids, mask, n=6)
    with sparq.enabled(model, TIGHT):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             cache_implementation="static")
        assert decoder(model) is not None
    assert torch.equal(out[:, ids.shape[1]:], expected)


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


class StopAfter(StoppingCriteria):
    """Stops row 0 after `n` new tokens, others run on (a per-row criterion)."""

    def __init__(self, start: int, n: int):
        self.start, self.n = start, n

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[0] = input_ids.shape[1] - self.start >= self.n
        return done


class Halve(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores / 2


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_processors_criteria_streamer_and_output_as_dense_generate(arch, no_fallback):
    """With every position kept, the handed-over path matches transformers' dense generate on the
    same request: tokens, scores, raw logits, the output's type and fields (but the cache, which the
    fast loop does not return), what the streamer receives, EOS padding of finished rows and a
    per-row stopping criterion, with logits processors from the config and from the caller."""
    model = tiny(arch)
    ids, mask, _ = prompts()

    def run(eos=None):
        streamer = Recorder()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=2,
                             logits_processor=LogitsProcessorList([Halve()]),
                             stopping_criteria=StoppingCriteriaList([StopAfter(ids.shape[1], 6)]),
                             streamer=streamer, return_dict_in_generate=True, output_scores=True, output_logits=True)
        return out, streamer

    def stops_early(seqs, eos):
        return any(bool((row[:-1] == eos).any()) for row in seqs[:, ids.shape[1]:])

    for eos in run()[0].sequences[:, ids.shape[1] + 2:ids.shape[1] + 6].flatten().tolist():
        dense, dense_stream = run(eos)
        if stops_early(dense.sequences, eos):  # an EOS some row reaches before the end
            break
    with sparq.enabled(model, LOOSE):
        got, got_stream = run(eos)
    assert type(got) is type(dense)
    assert set(got.keys()) == set(dense.keys()) - {"cache", "past_key_values"}
    assert torch.equal(got.sequences, dense.sequences)
    assert stops_early(got.sequences, eos), "no row stopped early at the EOS token"
    for row in got.sequences[:, ids.shape[1]:]:  # a row that reached its EOS is padded after it
        at = (row == eos).nonzero()
        if len(at):
            assert (row[int(at[0]) + 1:] == 0).all()

    assert len(got.scores) == len(dense.scores) and len(got.logits) == len(dense.logits)
    for a, b in zip(got.scores, dense.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(got.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert got_stream.ended == dense_stream.ended == 1
    assert len(got_stream.puts) == len(dense_stream.puts)
    for a, b in zip(got_stream.puts, dense_stream.puts):
        assert torch.equal(a, b)


def test_sampling_reproducible_and_as_dense(no_fallback):
    """Sampled decoding (temperature, top-k, top-p, several sequences per prompt) is reproducible
    under a seed and, with every position kept, draws dense generate's tokens."""
    model = tiny("qwen3")
    ids, mask, _ = prompts()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
              num_return_sequences=2)
    torch.manual_seed(7)
    dense = model.generate(ids, **kw)
    with sparq.enabled(model, LOOSE):
        torch.manual_seed(7)
        a = model.generate(ids, **kw)
    with sparq.enabled(model, TIGHT):
        torch.manual_seed(7)
        b = model.generate(ids, **kw)
        torch.manual_seed(7)
        c = model.generate(ids, **kw)
        assert decoder(model).batch == 6
    assert a.shape == dense.shape == (6, ids.shape[1] + 10)
    assert torch.equal(a, dense)
    assert torch.equal(b, c)


def test_decoder_is_reused_and_freed(no_fallback):
    model = tiny("llama")
    ids, mask, _ = prompts()
    with sparq.enabled(model, TIGHT):
        assert "generate" in model.__dict__
        greedy(model, ids, mask, n=4)
        first = decoder(model)
        greedy(model, ids[:, 5:], mask[:, 5:], n=4)  # shorter: same decoder
        assert decoder(model) is first
        greedy(model, ids[:2], mask[:2], n=4)  # another batch: a new one
        assert decoder(model) is not first and decoder(model).batch == 2
        long_ids = torch.randint(1, 90, (2, 300))
        greedy(model, long_ids, torch.ones_like(long_ids), n=4)  # more than its capacity: a new one
        assert decoder(model).max_len >= 305
    assert "generate" not in model.__dict__ and not sparq.is_enabled(model)


def test_dense_method_in_the_fast_loop(no_fallback):
    model = tiny("llama")
    ids, mask, _ = prompts()
    dense = greedy(model, ids, mask, n=8)
    with sparq.enabled(model, Dense()):
        assert torch.equal(greedy(model, ids, mask, n=8), dense)


def expect_fallback(match: str):
    return pytest.warns(SparQFallbackWarning, match=match)


@pytest.fixture
def fresh_warnings(monkeypatch):
    from sparq import hf_generate

    monkeypatch.setattr(hf_generate, "_warned", set())


def test_fallbacks_are_stated_once_and_give_todays_tokens(fresh_warnings):
    """Requests the fast loop does not run go to transformers' loop over SparQCache (today's path,
    same tokens as fast_loop=False), with a SparQFallbackWarning naming the reason, once."""
    model = tiny("llama")
    ids, mask, _ = prompts()
    beam = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=2)
    with sparq.enabled(model, TIGHT, fast_loop=False):
        want_beam = model.generate(ids, **beam)
        want_attn = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                   return_dict_in_generate=True, output_attentions=True)
    with sparq.enabled(model, TIGHT):
        with expect_fallback("beam"):
            got = model.generate(ids, **beam)
        assert torch.equal(got, want_beam)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SparQFallbackWarning)
            model.generate(ids, **beam)  # stated once
        with expect_fallback("output_attentions"):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True, output_attentions=True)
        assert torch.equal(out.sequences, want_attn.sequences) and out.attentions is not None
        right = torch.flip(mask, [1])  # right padding
        with expect_fallback("not left padding"):
            model.generate(torch.flip(ids, [1]), attention_mask=right, max_new_tokens=3, do_sample=False)
        first = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                               return_dict_in_generate=True)
        assert first.get("cache") is None  # the fast loop returns no transformers cache
        from transformers import DynamicCache

        with expect_fallback("cache was passed"):
            # under the model's own name for it: `cache` from transformers 5.24 on, `past_key_values` before
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                           **{sparq.hf.cache_arg(model): DynamicCache(config=model.config)})
        assert decoder(model) is not None


def test_unsupported_family_and_method_fall_back(fresh_warnings):
    model = tiny("gptneox")
    ids, mask, _ = prompts()
    with sparq.enabled(model, TIGHT, fast_loop=False):
        want = greedy(model, ids, mask, n=4)
    with sparq.enabled(model, TIGHT):
        with expect_fallback("no model family"):
            got = greedy(model, ids, mask, n=4)
        assert decoder(model) is None
    assert torch.equal(got, want)

    from sparq.methods import Streaming

    class NoStatic(Streaming):
        static_cache = False

    model = tiny("llama")
    with sparq.enabled(model, NoStatic(0.25, sinks=2, min_k=4)):
        with expect_fallback("no static-cache path"):
            greedy(model, ids, mask, n=3)


def test_bench_generate_engine_hf_runs_on_cpu(tmp_path):
    """`sparq bench generate --engine hf` on a tiny shape on the CPU: every row (dense generate with
    each cache setting, SparQ through sparq.enabled and through transformers' loop, the fast loop's
    dense and SparQ), the comparisons and the JSON."""
    import json

    from typer.testing import CliRunner

    from sparq.tools.cli import app

    # no --out-dir: the JSON goes to $OUT (as on the GPU machines, whose $OUT folder comes back)
    res = CliRunner().invoke(app, ["bench", "generate", "--engine", "hf", "--model", "tiny", "--device", "cpu",
                                   "--batch", "2", "--context", "20", "--new-tokens", "3", "--compressions", "4",
                                   "--ragged", "--hf-loop"], env={"OUT": str(tmp_path)})
    assert res.exit_code == 0, res.output
    (file,) = tmp_path.glob("generate-hf-tiny-cpu-*.json")
    rows = json.loads(file.read_text())["rows"]
    assert [(r["engine"], r["method"]) for r in rows] == [
        ("hf", "dense (dynamic)"), ("hf", "dense (static+compile)"), ("hf", "sparq 1/4 (sparq.enabled)"),
        ("hf", "sparq 1/4 (sparq.enabled, fast_loop=False)"), ("fast", "dense (FastDecoder)"),
        ("fast", "sparq 1/4 (FastDecoder)")]
    assert all(r["ms_per_token"] > 0 and "error" not in r for r in rows)
    assert "vs_fast_loop" in rows[2] and "speedup_vs_best_dense_generate" in rows[2]
    bad = CliRunner().invoke(app, ["bench", "generate", "--engine", "vllm"])
    assert bad.exit_code != 0 and "--engine must be fast or hf" in bad.output


def test_benchmark_json_goes_to_out_dir_then_env_out(monkeypatch, tmp_path):
    from pathlib import Path

    from sparq.tools.cli import results_dir

    monkeypatch.setenv("OUT", str(tmp_path))
    assert results_dir(Path("elsewhere")) == Path("elsewhere") and results_dir(None) == tmp_path
    monkeypatch.delenv("OUT")
    assert results_dir(None) == Path("benchmarks/results")


def test_bench_hf_keeps_going_past_a_failing_variant(tmp_path, monkeypatch):
    """One variant that raises (a compile error on the GPU, say) gets its error in its row; the others
    still run (a long GPU run must not be lost to one of them)."""
    from sparq.tools import bench_generate as bg

    real = bg._hf_row

    def flaky(lm, ids, mask, new_tokens, device, **gen):
        if gen.get("cache_implementation") == "static":
            raise RuntimeError("compile failed")
        return real(lm, ids, mask, new_tokens, device, **gen)

    monkeypatch.setattr(bg, "_hf_row", flaky)
    res = bg.bench_hf_generate("tiny", (1,), (12,), 3, (4,), engines=("hf",), device="cpu", dtype=torch.float32,
                               out_dir=None, print_rows=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["dense (static+compile)"]["error"] == "RuntimeError: compile failed"
    assert rows["dense (dynamic)"]["ms_per_token"] > 0 and "error" not in rows["sparq 1/4 (sparq.enabled)"]
    assert rows["sparq 1/4 (sparq.enabled)"]["best_dense_generate"] == "dense (dynamic)"
    assert "failed: RuntimeError" in bg.format_hf_table(res)
    with pytest.raises(RuntimeError, match="compile failed"):
        bg.bench_hf_generate("tiny", (1,), (12,), 3, (4,), engines=("hf",), device="cpu", dtype=torch.float32,
                             out_dir=None, print_rows=False, strict=True)
