"""A sliding-window layer's K/V in the fast loop: a ring of `size` slots per row.

Position p of a row lives in slot p % size, so once a row is longer than the window the ring
holds exactly the last `size` positions: what a sliding-window layer (a query at p sees keys
p - size < j <= p, as transformers masks it) attends to. Attention over the ring is dense and
order-free (a softmax over a set), so no slot needs to move; valid slots are those below the
row's length. Memory: the window, not the context.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods import DecodeInputs
from .attention import dense_attention


class WindowCache:
    def __init__(self, batch: int, num_kv_heads: int, size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.size = size
        self.key = torch.zeros(batch, num_kv_heads, size, head_dim, dtype=dtype, device=device)
        self.value = torch.zeros_like(self.key)
        self._slots = torch.arange(size, device=device)

    def prefill_attend(self, q: Tensor, k: Tensor, v: Tensor, start: int, lengths: Tensor, scale: float,
                       softcap: float | None = None) -> Tensor:
        """Prefill chunk [start, start + L) (q [B, Hq, L, d]; k, v [B, Hkv, L, d]): windowed causal
        attention over the ring's earlier positions and the chunk, then the chunk is written.
        Returns [B, Hq, L, d]. Every row holds the same positions below `start` except rows whose
        prompt ended earlier, whose queries here are padding (their outputs are never used)."""
        end = start + k.shape[2]
        k, v = k.to(self.key.dtype), v.to(self.value.dtype)
        kpos = torch.arange(start, end, device=k.device)
        if start > 0:  # the ring in position order holds start - size ... start - 1
            shift = start % self.size
            k_all = torch.cat([self.key.roll(-shift, 2), k], 2)
            v_all = torch.cat([self.value.roll(-shift, 2), v], 2)
            kpos = torch.cat([torch.arange(start - self.size, start, device=k.device), kpos])
        else:
            k_all, v_all = k, v
        qpos = torch.arange(start, end, device=k.device)[:, None]
        mask = (kpos[None] <= qpos) & (kpos[None] > qpos - self.size) & (kpos[None] >= 0)
        out = dense_attention(q, k_all, v_all, mask, scale, softcap)
        self._write_prefill(k, v, start, lengths)
        return out

    def _write_prefill(self, k: Tensor, v: Tensor, start: int, lengths: Tensor) -> None:
        # Slot s of row b must hold the newest real position p < min(lengths[b], end) with
        # p % size == s: from this chunk when p >= start, else it already does (or is empty).
        end = start + k.shape[2]
        m = lengths.to(k.device).long().clamp(max=end)[:, None]  # [B, 1]
        p = m - 1 - (m - 1 - self._slots[None]) % self.size  # [B, size]
        fresh = (p >= start)[:, None, :, None]
        idx = (p - start).clamp(0, k.shape[2] - 1)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.key.copy_(torch.where(fresh, k.gather(2, idx), self.key))
        self.value.copy_(torch.where(fresh, v.gather(2, idx), self.value))

    def append(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """k, v [B, Hkv, 1, d] at positions [B] (the slot positions % size); no host sync."""
        b, h, _, d = k.shape
        idx = (positions.long() % self.size).view(b, 1, 1, 1).expand(b, h, 1, d)
        self.key.scatter_(2, idx, k.to(self.key.dtype))
        self.value.scatter_(2, idx, v.to(self.value.dtype))

    def inputs(self, query: Tensor, lengths: Tensor, scale: float) -> DecodeInputs:
        """A decode step's inputs over the ring for rows of these lengths: the valid slots are a
        prefix (all of them once a row is longer than the window), so they come with lengths."""
        return DecodeInputs(query, self.key, self.value, self._slots[None, :] < lengths[:, None], scale,
                            lengths=lengths.clamp(max=self.size))
