import sys, torch
sys.path.insert(0, "tests"); sys.path.insert(0, "src")
import test_kernels as T
from sparq.kernels import dispatch
from sparq.kernels.dispatch import plan, sparq_decode
from sparq import reference
for det in (True, False):
    dispatch.TUNING["deterministic"] = det
    for ci in range(4, 12):
        batch, hq, hkv, seq, d, dtype, cfg = T.GPU_CASES[ci]
        for seed in (0, 1):
            gen = torch.Generator().manual_seed(seed)
            q, k, v, lengths = T._case(batch, hq, hkv, seq, d, dtype, gen)
            out = torch.full_like(q, float("nan"))
            sparq_decode(q, k, v, cfg, lengths, out=out)
            torch.cuda.synchronize()
            ws = plan(batch, hq, hkv, d, seq, cfg, q.device)
            valid = T.valid_mask(lengths, batch, seq, q.device)
            _, k_b, local_b = reference.budgets(cfg, valid)
            for bh in range(batch * hkv):
                b = bh // hkv
                L = int(lengths[b]); kb = int(k_b[b])
                sel = ws.idx[bh, :kb].long().cpu()
                bad = (sel >= L).sum().item() + (sel < 0).sum().item() + (kb - sel.unique().numel())
                if bad:
                    msg = f"det={det} case{ci} seed{seed} bh{bh} L={L} kb={kb} lb={int(local_b[b])} counts={ws.counts[bh].tolist()} state={ws.state[bh].tolist()} bad={bad} g={hq//hkv} S={seq}"
                    if det:
                        nt = (L + 1023) // 1024
                        words = ws.bits[bh, : nt * 32].cpu()
                        nbits = sum(bin(int(w) & 0xffffffff).count("1") for w in words.tolist())
                        msg += f" bits={nbits} tcount={ws.tile_counts[bh, :nt].tolist()} samples={ws.samples} cap={ws.cap}"
                    print(msg, flush=True)
    dispatch._WORKSPACES.clear()
print("done")
