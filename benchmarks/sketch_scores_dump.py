"""Dump the sketch scorer's step-1 outputs (logits, split max / sum of exp) for a fixed grid of shapes, to compare
two versions of `_sketch_scores_kernel` bit for bit on the same GPU.

The inputs depend only on the seeds and shapes here (the SketchState is built by its own prefill), so the dumps of
two checkouts are comparable:
  PYTHONPATH=<old>/src python benchmarks/sketch_scores_dump.py --out old.pt
  PYTHONPATH=src python benchmarks/sketch_scores_dump.py --out new.pt
  python benchmarks/sketch_scores_dump.py --compare old.pt new.pt
Grid: d 64/128/256 x bits 1/2 x g 1/4/8 x fp16/bf16, sketch block 128 (tiles of 128 positions; 64 at d = 256,
g = 8), ragged left-padded rows, one row shorter than a block (exact keys).
"""

from __future__ import annotations

import argparse

import torch


def run(out: str, device: str, only: str) -> None:
    from sparq.kernels.dispatch import DEFAULT_TUNING, DecodePlan
    from sparq.kernels.sketch_scores import SketchConfig
    from sparq.kernels.sketch_state import SketchState
    from sparq.methods.sketch import SparQSketch

    dev = torch.device(device)
    res = {}
    for d in (64, 128, 256):
        for bits in (1, 2):
            for g in (1, 4, 8):
                for dtype in (torch.float16, torch.bfloat16):
                    if only and only != f"{d},{bits},{g}" or (dev.type == "cpu" and dtype == torch.bfloat16):
                        continue
                    batch, hkv, seq, block = 3, 2, 1500, 128
                    gen = torch.Generator().manual_seed(d * 100 + bits * 10 + g)
                    q = torch.randn(batch, hkv * g, d, generator=gen).to(dev, dtype)
                    k = (torch.randn(batch, hkv, seq, d, generator=gen) * (1 + torch.rand(d, generator=gen) * 4)).to(dev, dtype)
                    v = torch.randn(batch, hkv, seq, d, generator=gen).to(dev, dtype)
                    lengths, starts = torch.tensor([seq, seq - 300, 100]), torch.tensor([0, 200, 50])
                    m = SparQSketch(1 / 8, bits=bits, block=block, local_fraction=0.25, reallocate=True, min_k=16)
                    st = SketchState(batch, hkv, d, seq, bits=bits, block=block, dtype=dtype, device=dev)
                    st.prefill(k, lengths.to(dev), starts.to(dev))
                    plan = DecodePlan(batch, hkv * g, hkv, d, seq, SketchConfig.from_method(m, d), dev, dtype,
                                      DEFAULT_TUNING)
                    plan.run(q, k, v, lengths.to(dev), starts=starts.to(dev), out=torch.empty_like(q), sketch=st)
                    logits = plan.logits.detach().cpu().clone().view(batch, hkv * g, -1)
                    for b in range(batch):  # past the row's length the workspace is not written
                        logits[b, :, int(lengths[b]):] = 0
                    res[(d, bits, g, str(dtype))] = {"logits": logits, "split_m": plan.split_m.detach().cpu().clone(),
                                                     "split_l": plan.split_l.detach().cpu().clone()}
    torch.save(res, out)
    print(f"{len(res)} configurations -> {out}")


def compare(a: str, b: str) -> None:
    x, y = torch.load(a), torch.load(b)
    for key in sorted(x, key=str):
        line = []
        for n in ("logits", "split_m", "split_l"):
            u, w = x[key][n], y[key][n]
            both = torch.isfinite(u) & torch.isfinite(w)
            same = torch.equal(u.nan_to_num(0, 1e30, -1e30), w.nan_to_num(0, 1e30, -1e30))
            diff = (u[both] - w[both]).abs().max().item() if both.any() else 0.0
            line.append(f"{n} {'equal' if same else f'DIFF max {diff:.3g}, {(u != w).sum().item()} elements'}")
        print(key, "; ".join(line))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="", help="one configuration, d,bits,g (a smoke test)")
    args = ap.parse_args()
    compare(*args.compare) if args.compare else run(args.out, args.device, args.only)
