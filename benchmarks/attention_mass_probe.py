"""Share of the true attention mass that each method's kept rows hold, per layer, at the first
answer step of one passkey item (dense generation; each method only selects). docs/EVAL.md,
issue-12 section. Usage: PYTHONPATH=src python benchmarks/attention_mass_probe.py MODEL LENGTH DEPTH [ITEM] [SPECS]"""
import sys, json, torch, dataclasses
from sparq import hf, reference
from sparq.methods import DecodeMethod, Dense, build_method, SparQSketch, SparQ
from sparq.methods._common import true_probs, lengths_of
from sparq.models import load
from sparq.tools.eval.tasks import passkey_items, TaskSizes
torch.set_num_threads(1)
model_name = sys.argv[1]; length = int(sys.argv[2]); depth = float(sys.argv[3]); idx = int(sys.argv[4]) if len(sys.argv) > 4 else 0
specs = sys.argv[5].split(",") if len(sys.argv) > 5 else ["sparq-sketch:local=0", "sparq-sketch", "sparq", "topk"]
model, tok = load(model_name)
cfg = model.config.get_text_config(decoder=True)
d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
items = passkey_items(tok, TaskSizes(lengths=(length,), depths=(depth,), items=idx + 1), 0)
it = items[idx]
ids = torch.tensor([it.prompt_ids])
print("prompt tokens", len(it.prompt_ids), "answer", it.answer)
methods = {s: build_method(s, "1/8", d) for s in specs}
stats = {s: [] for s in specs}

@dataclasses.dataclass(frozen=True)
class Probe(DecodeMethod):
    name = "probe"
    def attend(self, x):
        p = true_probs(x.query, x.key, x.valid, x.scale)  # [B,Hkv,g,S]
        S = x.key.shape[2]
        n = lengths_of(x.valid)
        for s, m in methods.items():
            if isinstance(m, SparQSketch):
                s_hat = m.approx_scores(x)
                k = torch.tensor([m.k_for(v, d) for v in n]); loc = torch.tensor([m.local_for(int(v)) for v in k])
                keep = reference.select_topk(s_hat.sum(2), x.valid, k, loc)
            elif isinstance(m, SparQ):
                c = m.config
                s_hat = reference.approx_scores(x.query, x.key, x.valid, c.r, x.scale)
                _, k, loc = reference.budgets(c, x.valid)
                keep = reference.select_topk(s_hat.sum(2), x.valid, k, loc)
            else:  # topk oracle
                k = torch.tensor([m.k_for(v, d) if hasattr(m, "k_for") else int(v * 0.0625) for v in n])
                keep = reference.select_topk(p.sum(2), x.valid, k, torch.zeros_like(k))
            mass = (p * keep[:, :, None]).sum(-1)  # [B,Hkv,g]
            lost = p * (~keep[:, :, None])
            first_blk = lost[..., :128].sum(-1); tail = lost[..., (S // 128) * 128:].sum(-1)
            stats[s].append(dict(mass=mass.mean().item(), lost_first=first_blk.mean().item(),
                                 lost_tail=tail.mean().item()))
        return Dense().attend(x)
    def data_fraction(self, length, head_dim): return 1.0

hf.enable(model, Probe())
with torch.inference_mode():
    from sparq.caches.dynamic import SparQCache
    cache = SparQCache(config=model.config)
    out = model(input_ids=ids, **{hf.cache_arg(model): cache}, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)
    out = model(input_ids=nxt[:, None], **{hf.cache_arg(model): cache}, use_cache=True)
for s, rows in stats.items():
    L = len(rows)
    print(f"{s:34s} mass kept {sum(r['mass'] for r in rows)/L:.3f}  per-layer min {min(r['mass'] for r in rows):.3f}"
          f"  lost in first block {sum(r['lost_first'] for r in rows)/L:.3f}  lost in tail block {sum(r['lost_tail'] for r in rows)/L:.3f}")
    print("   mass by layer:", " ".join(f"{r['mass']:.2f}" for r in rows))
