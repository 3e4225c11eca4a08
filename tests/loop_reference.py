"""An independent SparQ implementation: plain Python loops over batch and heads, float64.

Written from the algorithm's description, not from sparq.reference, so the two can catch each
other's mistakes. Slow; for small test inputs only.
"""

from __future__ import annotations

import math

import torch

from sparq import SparQConfig


def sparq_loop(q, K, V, config: SparQConfig, lengths, scale=None) -> torch.Tensor:
    B, Hq, d = q.shape
    Hkv = K.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(B, Hq, d, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        k_b, local_b = config.k_for(n), config.local_for(n)
        for kv in range(Hkv):
            Kb = K[b, kv, :n].double()
            Vb = V[b, kv, :n].double()
            heads = [kv * g + j for j in range(g)]
            qs = [q[b, h].double() for h in heads]
            # Step 1: dimensions by |q| summed over the group
            weight = sum(x.abs() for x in qs)
            order = sorted(range(d), key=lambda i: -float(weight[i]))
            dims = order[: min(config.r, d)]
            s_hats = []
            for x in qs:
                l1 = float(x.abs().sum())
                l1_sel = float(x[dims].abs().sum())
                ratio = 1.0 if l1 == 0 else max(l1_sel / l1, 1e-300)
                logits = (Kb[:, dims] @ x[dims]) * scale / math.sqrt(ratio)
                s_hats.append(torch.softmax(logits, 0))
            # Step 2: local window + top-(k - local) of the summed scores
            if k_b >= n:
                kept = list(range(n))
            else:
                local = list(range(n - local_b, n))
                total = sum(s_hats)
                rest = sorted(range(n - local_b), key=lambda i: -float(total[i]))
                kept = sorted(local + rest[: k_b - local_b])
            mean_v = Vb.mean(0)
            for j, h in enumerate(heads):
                x = qs[j]
                logits = (Kb[kept] @ x) * scale
                y = torch.softmax(logits, 0) @ Vb[kept]
                if config.reallocate:
                    alpha = 1.0 if k_b >= n else float(s_hats[j][kept].sum())
                    y = alpha * y + (1 - alpha) * mean_v
                out[b, h] = y
    return out


def dense_loop(q, K, V, lengths, scale=None) -> torch.Tensor:
    B, Hq, d = q.shape
    g = Hq // K.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(B, Hq, d, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for h in range(Hq):
            Kb, Vb = K[b, h // g, :n].double(), V[b, h // g, :n].double()
            out[b, h] = torch.softmax((Kb @ q[b, h].double()) * scale, 0) @ Vb
    return out
