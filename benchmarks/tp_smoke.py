"""GPU smoke test of the tensor-parallel fast loop under torchrun (NCCL): the functional all-reduce
inside the compiled layer functions and the captured CUDA graph. With N ranks each builds its slice
of a random-weight model; with 1 rank the all-reduce is a no-op collective, so the tokens must
equal those of the same model decoded without a process group.
    torchrun --nproc-per-node N benchmarks/tp_smoke.py     (PYTHONPATH=src)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sparq import SparQConfig
from sparq.tools.bench_generate import build_model
from sparq.fast import FastDecoder
from sparq.methods import Dense

torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl")
world, rank = dist.get_world_size(), dist.get_rank()
torch.manual_seed(0)
model = build_model("smollm2-135m", 4200, tp=world)
ids = torch.randint(0, 49152, (2, 4096))
lengths = torch.tensor([4096, 3000])
for compile in (True, False):
    for method in (Dense(), SparQConfig.from_compression(8, head_dim=64)):
        kw = dict(batch=2, max_len=4200, compile=compile)
        tp_tokens, t = FastDecoder(model, method, tp_group=dist.group.WORLD, **kw).generate(ids, lengths, 32)
        line = (f"rank {rank}/{world} {'compiled' if compile else 'eager'} {'dense' if method == Dense() else 'sparq'}: "
                f"tp {t.ms_per_token:.2f} ms/step")
        if world == 1:
            # the 1-rank all-reduce is an identity; the SparQ kernels are not bitwise deterministic
            # (atomics order the kept-index list), so the same decoder run twice is the baseline
            plain, t1 = FastDecoder(model, method, **kw).generate(ids, lengths, 32)
            again, _ = FastDecoder(model, method, **kw).generate(ids, lengths, 32)
            same = (plain == tp_tokens).all(1).tolist()
            line += (f", no group {t1.ms_per_token:.2f} ms/step, rows with equal tokens: {same}; "
                     f"no group run twice, rows equal: {(plain == again).all(1).tolist()}")
        print(line, flush=True)
dist.destroy_process_group()
