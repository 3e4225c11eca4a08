"""Passkey with a real-text haystack (the eval's default prose) instead of the repeated filler
(docs/EVAL.md, issue-12 section). Appends eval-style records to OUT.
Usage: PYTHONPATH=src python benchmarks/passkey_haystack.py MODEL OUT SPECS LENGTHS DEPTHS ITEMS_PER_CELL"""
import sys, json, random, time, torch
from sparq.tools.eval import runner
from sparq.tools.eval.tasks import load_text, text_tokens, _bos, PASSKEY_INTRO
from sparq.methods import build_method
from sparq.models import load
torch.set_num_threads(1)
model_name, out = sys.argv[1], sys.argv[2]
specs = sys.argv[3].split(",")
lengths = [int(x) for x in sys.argv[4].split(",")]
depths = [float(x) for x in sys.argv[5].split(",")]
n_items = int(sys.argv[6])
model, tok = load(model_name)
cfg = model.config.get_text_config(decoder=True)
d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
text = text_tokens(tok, load_text(None))
rng = random.Random("haystack-0")
items = []
for L in lengths:
    for dep in depths:
        for i in range(n_items):
            key = str(rng.randint(10000, 99999))
            needle = text_tokens(tok, f" The pass key is {key}. Remember it. {key} is the pass key. ")
            head = _bos(tok) + text_tokens(tok, PASSKEY_INTRO)
            tail = text_tokens(tok, "\n\nWhat is the pass key? The pass key is")
            n_fill = L - len(head) - len(tail) - len(needle)
            off = rng.randint(0, len(text) - n_fill - 1)
            fill = text[off: off + n_fill]
            cut = int(dep * n_fill)
            items.append(dict(id=f"L{L}-D{dep:g}-{i}", L=L, depth=dep, key=key, ids=head + fill[:cut] + needle + fill[cut:] + tail))
methods = {s: build_method(s, 1.0 if s == "dense" else "1/8", d) for s in specs}
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
fh = open(out, "a")
for b0 in range(0, len(items), 4):
    batch = items[b0:b0 + 4]
    ids, mask = runner._left_pad([it["ids"] for it in batch], pad)
    cache, logits = runner.prefill(model, ids, mask, methods["dense"])
    import copy
    for s, m in methods.items():
        t0 = time.time()
        toks, _, fr = runner.decode(model, m, copy.deepcopy(cache), logits, mask.clone(), 8, d)
        for i, it in enumerate(batch):
            txt = tok.decode(toks[i].tolist(), skip_special_tokens=True)
            fh.write(json.dumps(dict(model=model_name, task="passkey", method=s, budget="1" if s == "dense" else "1/8",
                                     item=it["id"], meta_length=it["L"], meta_depth=it["depth"], score=float(it["key"] in txt),
                                     output=txt, fraction=fr[i], decode_s=round(time.time() - t0, 2))) + "\n")
        fh.flush()
    print(b0, flush=True)
