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
from sparq.methods import SparQ

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
    with sparq.enabled(model, method):
        sparse = model.generate(ids, **gen)[:, ids.shape[1]:]
    return {"dense": dense.tolist(), "sparq": sparse.tolist(), "heads": sorted(method.heads)}


if __name__ == "__main__":
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
    result = run(model)
    with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
