"""The evaluation harness on a tiny random Llama and a byte-level tokenizer built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sparq.tools.eval import report, tasks
from sparq.tools.eval.runner import _left_pad, decode, evaluate, load_records, prefill
from sparq.tools.eval.tasks import Item, TaskSizes
from sparq.methods import Dense

TEXT = " ".join(
    f"Sentence number {i} talks about the {w} and the {v} in plain words." for i, (w, v) in
    enumerate(zip(["river", "hill", "town", "lamp", "road", "field"] * 40, ["sky", "sea", "door", "wind"] * 60))
)


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init, so sparse methods differ
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model, tok


SMALL = TaskSizes(lengths=(400, 700), depths=(0.2, 0.8), items=1, repetition_context=150, repetition_tokens=8,
                  ppl_context=120, ppl_tokens=6, kv_pairs=8, qa_items=2)


def test_passkey_items_grid_and_depth(tiny):
    _, tok = tiny
    sizes = TaskSizes(lengths=(1500, 2500), depths=(0.2, 0.8), items=1)
    items = tasks.passkey_items(tok, sizes, seed=1)
    assert len(items) == 4
    for it in items:
        text = tok.decode(it.prompt_ids)
        assert text.count(it.answer) == 2 and text.endswith("The pass key is")
        assert abs(len(it.prompt_ids) - it.meta["length"]) <= len(tasks.text_tokens(tok, tasks.FILLER))
        hay = text.split(tasks.PASSKEY_INTRO)[1].split("\n\nWhat is")[0]
        needle = hay.index("The pass key is")
        where = needle / (len(hay) - len(f"The pass key is {it.answer}. Remember it. {it.answer} is the pass key. "))
        assert abs(where - it.meta["depth"]) < 0.1
    assert tasks.passkey_items(tok, sizes, seed=1)[0].answer == items[0].answer  # seeded
    assert tasks.passkey_items(tok, sizes, seed=2)[0].answer != items[0].answer


def test_kv_and_repetition_items(tiny):
    _, tok = tiny
    for it in tasks.kv_items(tok, SMALL, seed=0):
        text = tok.decode(it.prompt_ids)
        key = text.rsplit("\n", 1)[1][:-1]
        assert f"{key}: {it.answer}\n" in text
    for it in tasks.repetition_items(tok, SMALL, seed=0, text=TEXT):
        cue = it.prompt_ids[-32:]
        ctx = it.prompt_ids[: SMALL.repetition_context]
        starts = [i for i in range(len(ctx) - 32) if ctx[i: i + 32] == cue]
        assert starts and ctx[starts[0] + 32: starts[0] + 32 + 8] == it.target_ids


def test_scoring():
    _, tok = None, _tokenizer()
    rep = Item("repetition", "r", [], "generate", 4, target_ids=[5, 6, 7, 8])
    assert tasks.score_generation(rep, [5, 6, 9, 8], tok)[0] == 2
    assert tasks.score_generation(rep, [5, 6, 7, 8], tok)[0] == 4
    pk = Item("passkey", "p", [], "generate", 8, answer="12345")
    assert tasks.score_generation(pk, tok(" 12345. ")["input_ids"], tok)[0] == 1
    assert tasks.score_generation(pk, tok(" 12346").input_ids, tok)[0] == 0
    qa = Item("qa", "q", [], "generate", 8, answer=json.dumps(["Kestrel Bay"]))
    assert tasks.score_generation(qa, tok(" the kestrel bay.\nMore").input_ids, tok)[0] == 1
    assert tasks.score_generation(qa, tok(" Kestrel").input_ids, tok)[0] == 0


def test_qa_jsonl_formats(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"context": "c", "question": "q?", "answers": {"text": ["a", "b"]}}) + "\n\n"
                 + json.dumps({"id": "x", "context": "c", "question": "q?", "answer": "z"}) + "\n")
    rows = tasks.read_qa_jsonl(p)
    assert [r["answers"] for r in rows] == [["a", "b"], ["z"]] and rows[1]["id"] == "x"
    p.write_text(json.dumps({"context": "c", "question": "q?"}) + "\n")
    with pytest.raises(ValueError):
        tasks.read_qa_jsonl(p)
    sample = tasks.make_qa_sample(tmp_path / "s.jsonl", TEXT, n=3, context_words=100)
    rows = tasks.read_qa_jsonl(sample)
    assert len(rows) == 3 and all(r["answers"][0] in r["context"] for r in rows)


def test_runner_decode_matches_generate(tiny):
    """The harness's prefill + decode loop (left padded batch, Dense method) gives exactly the
    tokens of transformers' own greedy generate."""
    model, tok = tiny
    prompts = [tok("Some words here and more")["input_ids"], tok("Hi")["input_ids"]]
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    cache, logits = prefill(model, ids, mask, Dense())
    got, logp, frac = decode(model, Dense(), cache, logits, mask, 6, 16)
    from sparq import disable
    disable(model)
    assert torch.equal(got, want)
    assert frac == [1.0, 1.0] and torch.all(logp <= 0)


def test_evaluate_resumable_and_full_budget_equals_dense(tiny, tmp_path):
    model, tok = tiny
    methods = ["dense", "topk", "h2o", "sparq-sketch"]
    recs = evaluate(model, tok, "tiny", ["passkey", "perplexity"], methods, ["1", "1/4"], tmp_path, SMALL,
                    batch_size=3, text_file=None, log=lambda s: None)
    n_items = 4 + SMALL.items
    assert len(recs) == n_items * (1 + 3 * 2)
    by = {(r["task"], r["method"], r["budget"], r["item"]): r for r in recs}
    for (task, m, b, item), r in by.items():
        if b == "1" and m != "dense":  # a budget covering everything is dense attention
            d = by[(task, "dense", "1", item)]
            assert r["score"] == pytest.approx(d["score"], abs=1e-4)
            assert r.get("output") == d.get("output") and r["fraction"] == 1.0
        if b == "1/4" and m != "sparq-sketch":  # (the sketch reads exact keys below one block)
            assert r["fraction"] <= 0.25 + 1e-9
    assert any(by[("perplexity", m, "1/4", "ppl-0")]["score"] != by[("perplexity", "dense", "1", "ppl-0")]["score"]
               for m in ("topk", "h2o", "sparq-sketch"))
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines()
    again = evaluate(model, tok, "tiny", ["passkey", "perplexity"], methods, ["1", "1/4"], tmp_path, SMALL,
                     batch_size=3, log=lambda s: None)
    assert path.read_text().splitlines() == lines and len(again) == len(recs)
    path.write_text("\n".join(lines[:-2]) + "\n")  # lose two results: only those are redone
    evaluate(model, tok, "tiny", ["passkey", "perplexity"], methods, ["1", "1/4"], tmp_path, SMALL,
             batch_size=3, log=lambda s: None)
    redone = load_records(path)
    assert len(redone) == len(lines)
    assert {report_key(r) for r in redone} == {report_key(json.loads(x)) for x in lines}


def report_key(r):
    return (r["task"], r["method"], r["budget"], r["item"])


def test_report_tables_and_plots(tmp_path):
    recs = []
    for m, b, s, f in [("dense", "1", 2.0, 1.0), ("topk", "1/8", 1.0, 0.125), ("topk", "1/4", 2.0, 0.25)]:
        recs.append({"model": "x", "task": "repetition", "method": m, "budget": b, "item": "a", "score": s,
                     "fraction": f})
    for m, b, s, f in [("dense", "1", 1.0, 1.0), ("topk", "1/8", 2.0, 0.125)]:
        recs.append({"model": "x", "task": "perplexity", "method": m, "budget": b, "item": "a", "score": s,
                     "fraction": f})
    for m, sc in [("dense", 1.0), ("topk", 0.0)]:
        for L in (100, 200):
            recs.append({"model": "x", "task": "passkey", "method": m, "budget": "1" if m == "dense" else "1/8",
                         "item": f"{L}", "score": sc, "fraction": 1.0, "meta_length": L, "meta_depth": 0.5})
    rows = report.report(recs, tmp_path, {"model": "x"})
    rel = {(r["task"], r["method"], r["budget"]): r["rel_dense"] for r in rows}
    assert rel[("repetition", "topk", "1/8")] == 0.5 and rel[("perplexity", "topk", "1/8")] == 0.5
    assert rel[("passkey", "topk", "1/8")] == 0.0
    for f in ("results.json", "results.csv", "results.md", "repetition.png", "perplexity.png", "passkey_heatmap.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "| topk | 2.00 (100%) | 1.00 (50%) |" in (tmp_path / "results.md").read_text()


def test_eval_command_end_to_end(tiny, tmp_path):
    """The typer command on a saved tiny model: runs, resumes, writes results."""
    import typer
    from typer.testing import CliRunner

    from sparq.tools.eval.command import eval_command

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    app = typer.Typer()
    app.command()(eval_command)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"context": TEXT[:300] + " Ada was born in Marlow. " + TEXT[300:600],
                                      "question": "Where was Ada born?", "answers": ["Marlow"], "id": i}) + "\n"
                          for i in range(2)))
    args = ["--model", str(tmp_path / "m"), "--tasks", "kv,qa", "--methods", "dense,quest,streaming",
            "--qa-file", str(qa),
            "--budgets", "2", "--out", str(tmp_path / "out"), "--items", "1", "--threads", "1",
            "--text-file", str(_write(tmp_path / "t.txt", TEXT))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = next((tmp_path / "out").iterdir())
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["results"]} == {"dense", "quest", "streaming"}
    assert {r["budget"] for r in data["results"]} == {"1", "1/2"}  # --budgets 2 is 1/2
    assert {r["task"] for r in data["results"]} == {"kv", "qa"}
    n = len((out / "records.jsonl").read_text().splitlines())
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == n
    bad = CliRunner().invoke(app, args[:-2] + ["--methods", "nosuch"])
    assert bad.exit_code != 0


def _write(p: Path, s: str) -> Path:
    p.write_text(s)
    return p


def test_settings_key_covers_every_setting_of_a_task():
    from dataclasses import replace

    from sparq.tools.eval.runner import settings_key

    base = dict(seed=0, batch_size=6, device="cpu")
    key = {t: settings_key("m", t, SMALL, **base) for t in tasks.TASKS}
    for task, change in [("passkey", dict(lengths=(400,))), ("passkey", dict(depths=(0.5,))),
                         ("passkey", dict(items=2)), ("kv", dict(kv_pairs=9)), ("kv", dict(items=3)),
                         ("repetition", dict(repetition_context=151)), ("repetition", dict(repetition_tokens=9)),
                         ("perplexity", dict(ppl_context=121)), ("perplexity", dict(ppl_tokens=7)),
                         ("qa", dict(qa_items=3))]:
        assert settings_key("m", task, replace(SMALL, **change), **base) != key[task], (task, change)
    # a size another task uses does not touch this task's records
    assert settings_key("m", "passkey", replace(SMALL, ppl_tokens=99), **base) == key["passkey"]
    for other in [dict(seed=1), dict(batch_size=5), dict(device="cuda")]:
        assert settings_key("m", "kv", SMALL, **{**base, **other}) != key["kv"], other
    assert settings_key("other-model", "kv", SMALL, **base) != key["kv"]
    assert settings_key("m", "kv", SMALL, **{**base, "device": "cpu:0"}) == key["kv"]


def test_settings_key_reads_files_by_content(tmp_path):
    from sparq.tools.eval.runner import settings_key

    a, b = _write(tmp_path / "a.txt", "one text"), _write(tmp_path / "b.txt", "another text")
    kw = dict(seed=0, batch_size=6, device="cpu")
    assert settings_key("m", "repetition", SMALL, text_file=a, **kw) != settings_key("m", "repetition", SMALL,
                                                                                      text_file=b, **kw)
    assert settings_key("m", "repetition", SMALL, text_file=a, **kw) == settings_key(
        "m", "repetition", SMALL, text_file=_write(tmp_path / "c.txt", "one text"), **kw)
    assert settings_key("m", "qa", SMALL, qa_file=a, **kw) != settings_key("m", "qa", SMALL, qa_file=b, **kw)
    assert settings_key("m", "kv", SMALL, text_file=a, **kw) == settings_key("m", "kv", SMALL, text_file=b, **kw)


def test_resume_only_matches_identical_settings(tiny, tmp_path):
    """A rerun with identical settings computes nothing; changed task sizes or a changed method
    config (a default that moved, an option) recompute; the returned records are this run's."""
    from dataclasses import replace

    model, tok = tiny
    sizes = replace(SMALL, kv_pairs=6)
    run = dict(batch_size=3, log=lambda s: None)
    path = tmp_path / "records.jsonl"
    first = evaluate(model, tok, "tiny", ["kv"], ["dense", "topk"], ["1/4"], tmp_path, sizes, **run)
    n = len(path.read_text().splitlines())
    assert n == len(first) == 2 * 2 * sizes.items and all(r["settings"] and r["config"] for r in first)
    assert evaluate(model, tok, "tiny", ["kv"], ["dense", "topk"], ["1/4"], tmp_path, sizes, **run) == first
    assert len(path.read_text().splitlines()) == n  # nothing recomputed

    bigger = replace(sizes, kv_pairs=7)  # quick vs full differ like this: never counted as done
    second = evaluate(model, tok, "tiny", ["kv"], ["dense", "topk"], ["1/4"], tmp_path, bigger, **run)
    assert len(path.read_text().splitlines()) == 2 * n
    assert {r["settings"] for r in second}.isdisjoint({r["settings"] for r in first})
    assert len(second) == len(first)  # only this run's settings are returned (and reported)

    other_seed = evaluate(model, tok, "tiny", ["kv"], ["dense"], ["1/4"], tmp_path, sizes, seed=1, **run)
    assert len(path.read_text().splitlines()) == 2 * n + len(other_seed)

    # records of the same spec made with another method config (e.g. before a default changed)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for r in lines:
        if r["method"] == "topk" and r["settings"] == first[0]["settings"]:
            r["config"] = r["config"].replace("min_k=16", "min_k=8")
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    again = evaluate(model, tok, "tiny", ["kv"], ["dense", "topk"], ["1/4"], tmp_path, sizes, **run)
    redone = len(path.read_text().splitlines()) - len(lines)
    assert redone == len([r for r in first if r["method"] == "topk"])
    assert {r["config"] for r in again if r["method"] == "topk"} == {r["config"] for r in first if r["method"] == "topk"}


def test_eval_writes_outside_the_committed_results_by_default():
    import inspect

    from sparq.tools.eval.command import eval_command

    default = inspect.signature(eval_command).parameters["out"].default.default
    assert default == Path("runs/eval")
    root = Path(__file__).resolve().parents[1]
    assert "/runs/" in (root / ".gitignore").read_text().split()
    assert not (root / default).is_relative_to(root / "results")


def test_report_shows_every_method_spec(tmp_path, monkeypatch):
    """Specs with options (README's recommended sparq-sketch:local=0 among them) appear in every
    table and plot of the report."""
    import matplotlib.axes

    specs = ["dense", "sparq", "sparq-sketch", "sparq-sketch:local=0", "sparq:realloc=1", "h2o:recent=0.25"]
    recs = []
    for task in ("passkey", "perplexity"):
        for m in specs:
            for b in (["1"] if m == "dense" else ["1/4", "1/8"]):
                rec = {"model": "x", "task": task, "method": m, "budget": b, "item": "a", "fraction": 1 / 8,
                       "score": 0.5 if task == "passkey" else 3.0}
                if task == "passkey":
                    rec.update(meta_length=100, meta_depth=0.5)
                recs.append(rec)
    labels: list[str] = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    titles: list[str] = []
    original_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, t, *a, **k: (titles.append(t), original_title(self, t, *a, **k))[1])
    report.report(recs, tmp_path, {"model": "x"})
    md = (tmp_path / "results.md").read_text()
    header = [line for line in md.splitlines() if line.startswith("| task |")][0]
    for m in specs:
        assert f" {m} |" in header, (m, header)  # the all-methods table at each budget
        assert f"| {m} |" in md  # a row in each task's table
        if m != "dense":
            assert labels.count(m) == 2, (m, labels)  # a line in both tasks' plots
            assert f"{m} @1/8" in titles  # a panel of the needle heatmap
