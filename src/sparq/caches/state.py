"""What SparQ derives from a layer's K and V, in one place for both caches.

Both decode caches keep, beside K and V, the same derived state per layer:
  * key_t [B, Hkv, d, capacity]: K transposed (columns [0, n) in use), so the paper's step 1 reads
    r whole rows contiguous along the sequence (only methods that need it: `needs_key_t`);
  * value_sum [B, Hkv, d] fp32: the sum of V over the valid positions, for step 3's mean;
  * lengths [B] int32 and, for left-padded rows, starts [B] int32: row b's valid positions are
    the run [starts[b], starts[b] + lengths[b]), which is what the kernels take;
  * sketch (only methods that score with one: `sketch_spec` = (bits, block)): the packed low-bit
    per-channel key sketch with per-block ranges (`kernels.sketch_state.SketchState`), kept by the
    Triton append where the kernels run and by its PyTorch append elsewhere (CPU), so no path
    rebuilds it per step (only a head_dim * bits that is not a multiple of 32 has none: the method
    then computes its sketch in PyTorch every step).
`DerivedState` writes it at prefill (`write`: a chunk of positions, masked by validity), extends it
on a decode step (`append_column`: one position per row, no host sync) and forgets it (`reset`).
The static kernel cache (`caches.static.KernelCacheLayer`) holds one over its fixed capacity and its
own K/V buffers; transformers' growing cache (`caches.dynamic.SparQCache`) holds one per layer that grows
with the sequence (capacity doubling, so a step writes one column in place) and rebuilds it from K,
V and the attention mask after a crop, reorder or reset. The fused Triton append
(`kernels.append`) writes the same buffers as `append_column`.

Memory per position and KV head: d * elt bytes of Kᵀ when kept (+50% of the K/V cache), or
d * bits / 8 + 4 * d / block bytes of sketch (d = 128, block 128: 20 B at 1 bit, 36 B at 2 bits,
+3.9% / +7.0% of fp16 K and V); per row and KV head 4 * d bytes of V sum and 8 bytes of run bounds.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DerivedState:
    """Kᵀ (optional), the fp32 V sum and the valid runs of one layer; see the module docstring."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, *, keep_key_t: bool, growable: bool = False,
                 sketch_spec: tuple[int, int] | None = None) -> None:
        device = torch.device(device)
        self.growable = growable
        self.sketch_spec = sketch_spec
        self.sketch = None  # kernels.sketch_state.SketchState: kept by the kernels or in PyTorch
        if sketch_spec is not None:
            from ..kernels.sketch_state import SketchState, sketch_storable

            bits, block = sketch_spec
            if sketch_storable(head_dim, bits, block):
                self.sketch = SketchState(batch, num_kv_heads, head_dim, capacity, bits=bits, block=block,
                                          dtype=dtype, device=device)
        self.key_t_buf = (torch.zeros(batch, num_kv_heads, head_dim, capacity, dtype=dtype, device=device)
                          if keep_key_t else None)
        self.value_sum = torch.zeros(batch, num_kv_heads, head_dim, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.starts: Tensor | None = None  # None: every row's run starts at position 0
        self.capacity = capacity

    @property
    def key_t(self) -> Tensor | None:
        """Kᵀ over the whole capacity (static caches: the kernels read it with lengths)."""
        return self.key_t_buf

    def key_t_upto(self, n: int) -> Tensor | None:
        """Kᵀ columns [0, n): what a growing cache of n positions hands the method."""
        return None if self.key_t_buf is None else self.key_t_buf[..., :n]

    def reset(self) -> None:
        if self.key_t_buf is not None:
            self.key_t_buf.zero_()
        self.value_sum.zero_()
        self.lengths.zero_()
        self.starts = None

    def reserve(self, n: int, used: int) -> None:
        """A growable state: make room for n positions, keeping columns [0, used) (capacity doubles,
        so appending costs O(1) amortised)."""
        if n <= self.capacity:
            return
        if not self.growable:
            raise ValueError(f"{n} positions exceed the cache capacity {self.capacity}")
        new_cap = max(n, 2 * self.capacity)
        if self.key_t_buf is not None:
            buf = self.key_t_buf.new_zeros(*self.key_t_buf.shape[:-1], new_cap)
            buf[..., :used] = self.key_t_buf[..., :used]
            self.key_t_buf = buf
        if self.sketch is not None:
            self.sketch.grow(new_cap, used)
        self.capacity = new_cap

    def write(self, key: Tensor, value: Tensor, start: int, valid: Tensor) -> None:
        """Positions [start, start + L) of every row from key, value [B, Hkv, L, d], where valid
        [B, L] says which are real tokens: Kᵀ columns (zeros where invalid) and the V sum (added;
        start == 0 begins a new fill). Run bounds are the caller's (`set_runs`)."""
        end = start + key.shape[2]
        self.reserve(end, start)
        mask = valid[:, None, :, None]
        if start == 0:
            self.value_sum.zero_()
        self.value_sum.add_(value.float().masked_fill(~mask, 0.0).sum(2))
        if self.key_t_buf is not None:
            k = torch.where(mask, key.to(self.key_t_buf.dtype), 0)
            self.key_t_buf[..., start:end] = k.transpose(-1, -2)

    def build_sketch(self, key: Tensor) -> None:
        """After a prefill: the sketch of the K buffer key [B, Hkv, S, d] over the valid runs
        (O(S * d), no host sync). Needs the runs (`set_runs`) first."""
        if self.sketch is not None:
            self.sketch.prefill(key, self.lengths, self.starts)

    def append_sketch(self, key_new: Tensor, key: Tensor, logical_pos: Tensor) -> None:
        """Code one new position per row (key_new [B, Hkv, d]) at its logical position (the row's
        length before it), the K buffer `key` already holding it. One launch, no host sync."""
        if self.sketch is not None:
            self.sketch.append(key_new, key, logical_pos, self.starts)

    def set_runs(self, lengths: Tensor, starts: Tensor | None = None) -> None:
        self.lengths.copy_(lengths.to(device=self.lengths.device, dtype=torch.int32))
        self.starts = None if starts is None else starts.to(device=self.lengths.device, dtype=torch.int32)

    def append_column(self, key: Tensor, value: Tensor, pos: Tensor | int, *, old_value: Tensor | None = None,
                      valid: Tensor | None = None) -> None:
        """One position per row: key, value [B, Hkv, d] at pos (an int, or int [B] on the device).
        old_value [B, Hkv, d]: the V row this write replaces (a full static row), taken out of the
        sum; valid [B] bool: rows whose new position is padding add nothing. No host sync."""
        if isinstance(pos, int):  # a growing cache: room for the new column (Kᵀ and sketch)
            self.reserve(pos + 1, pos)
        v = value.float()
        if valid is not None:
            v = v.masked_fill(~valid[:, None, None], 0.0)
        self.value_sum.add_(v if old_value is None else v - old_value.float())
        if self.key_t_buf is None:
            return
        if isinstance(pos, int):
            self.key_t_buf[..., pos] = key.to(self.key_t_buf.dtype)
        else:
            b, h, d = key.shape
            idx = pos.long().view(b, 1, 1, 1).expand(b, h, d, 1)
            self.key_t_buf.scatter_(3, idx, key.to(self.key_t_buf.dtype).unsqueeze(-1))


def valid_runs(valid: Tensor) -> tuple[Tensor, Tensor, bool] | None:
    """(starts, lengths, left_padded) when every row's valid positions are one non-empty run that
    ends at the newest position (what transformers' generate makes of a left-padded batch), else
    None. One host sync: call it at (re)build, never per decode step."""
    seq_len = valid.shape[-1]
    counts = valid.sum(-1)
    starts = (seq_len - counts).to(torch.int32)
    run = torch.arange(seq_len, device=valid.device)[None, :] >= starts[:, None]
    if not (bool((run == valid).all()) and bool((counts > 0).all())):
        return None
    return starts, counts.to(torch.int32), bool((starts > 0).any())
