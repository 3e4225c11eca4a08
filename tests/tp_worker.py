"""Run under torchrun: tensor-parallel generation (dense and SparQ) of a saved tiny model.

argv: model_dir out_dir. Each rank writes its tokens and the head counts its attention saw.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import sparq
from sparq.fast import FastDecoder, left_align
from sparq.methods import Dense, SparQ

CFG = sparq.SparQConfig(r=2, k=6, local_window=2)


class Recording(SparQ):
    def attend(self, x):
        object.__getattribute__(self, "heads").add((x.query.shape[1], x.key.shape[1]))
        return super().attend(x)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 96, (3, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0  # a left-padded row
    return ids, mask


def run(model) -> dict:
    ids, mask = prompts()
    gen = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    dense = model.generate(ids, **gen)[:, ids.shape[1]:]
    method = Recording(CFG)
    object.__setattr__(method, "heads", set())
    with sparq.enabled(model, method, fast_loop=False):  # transformers' loop over SparQCache
        sparse = model.generate(ids, **gen)[:, ids.shape[1]:]
    with sparq.enabled(model, CFG):  # model.generate handed to the fast loop
        handed = model.generate(ids, **gen)[:, ids.shape[1]:]
        handed_heads = [getattr(model, sparq.hf._CTX_ATTR).decoder.num_q_heads,
                        getattr(model, sparq.hf._CTX_ATTR).decoder.num_kv_heads]
    return {"dense": dense.tolist(), "sparq": sparse.tolist(), "heads": sorted(method.heads),
            "sparq_generate_fast": handed.tolist(), "heads_generate_fast": handed_heads}


def run_fast(model, tp_group=None) -> dict:
    """FastDecoder generation (dense and SparQ) of the same prompts, left-aligned with lengths."""
    aligned, lengths = left_align(*prompts())
    out = {}
    for name, method in (("dense", Dense()), ("sparq", CFG)):
        dec = FastDecoder(model, method, batch=3, max_len=48, prefill_chunk=16, tp_group=tp_group)
        out[name] = dec.generate(aligned, lengths, 8)[0].tolist()
        out["heads"] = [dec.num_q_heads, dec.num_kv_heads]
    return out


def local_shard(model_dir: str, rank: int, world: int):
    """A plain model holding one rank's slices (heads, MLP columns) of the saved model: what
    FastDecoder(tp_group=...) runs when no DTensor weights are involved (bench generate --tp)."""
    full = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cfg = full.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    local_cfg = type(cfg).from_dict({**cfg.to_dict(), "num_attention_heads": cfg.num_attention_heads // world,
                                     "num_key_value_heads": cfg.num_key_value_heads // world, "head_dim": d,
                                     "intermediate_size": cfg.intermediate_size // world})
    local = type(full)(local_cfg).eval()
    state = {}
    for name, w in full.state_dict().items():
        if any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            w = w.chunk(world, 0)[rank]
        elif any(p in name for p in ("o_proj", "down_proj")):
            w = w.chunk(world, 1)[rank]
        state[name] = w.clone()
    local.load_state_dict(state)
    return local


if __name__ == "__main__":
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    result = run(model)
    result["fast"] = run_fast(model)
    result["fast_local"] = run_fast(local_shard(model_dir, dist.get_rank(), dist.get_world_size()),
                                    tp_group=dist.group.WORLD)
    with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
