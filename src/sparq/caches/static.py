"""Static, preallocated decode cache in the layout the SparQ kernels read.

Per layer: K [B, Hkv, Smax, d], K^T [B, Hkv, d, Smax] (contiguous along the sequence, for step 1),
V [B, Hkv, Smax, d], an fp32 running sum of V over the valid positions [B, Hkv, d] (for the
reallocation's mean) and the valid lengths [B] as an int32 device tensor. Positions >= lengths[b]
are padding. Appending one token writes in place at position lengths[b] of every row with no host
synchronisation, so a decode step over this cache can be captured in a CUDA graph.

Memory: (3 * elt * d * Smax + 4 * d) bytes per KV head and layer (1.5x a plain K/V cache).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .state import DerivedState


class KernelCacheLayer:
    """One layer's buffers; see the module docstring. K and V are this cache's own; Kᵀ, the V sum
    and the lengths are the layer's `caches.state.DerivedState`, the same code transformers' cache
    (`SparQCache`) derives its state with."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, *, keep_key_t: bool = True,
                 sketch_spec: tuple[int, int] | None = None):
        device = torch.device(device)
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        # Dense attention never reads Kᵀ: keep_key_t=False saves that third of the memory.
        # A sketch-scored method keeps its packed key sketch instead (sketch_spec = (bits, block)).
        self.derived = DerivedState(batch, num_kv_heads, head_dim, max_len, dtype, device, keep_key_t=keep_key_t,
                                    sketch_spec=sketch_spec)
        self.max_len = max_len
        from .. import kernels

        # one-launch append (kernels.append) where the Triton kernels run; decided once, not per step
        self._kernel_append = head_dim in kernels.SUPPORTED_HEAD_DIMS and kernels.available(device)

    @property
    def key_t(self) -> Tensor | None:
        return self.derived.key_t

    @property
    def sketch(self):
        """The packed key sketch (`kernels.sketch_state.SketchState`), or None."""
        return self.derived.sketch

    def finish_prefill(self) -> None:
        """After the last prefill chunk: build what is derived from the whole prompt (the sketch)."""
        self.derived.build_sketch(self.key)

    @property
    def value_sum(self) -> Tensor:
        return self.derived.value_sum

    @property
    def lengths(self) -> Tensor:
        return self.derived.lengths

    @lengths.setter
    def lengths(self, shared: Tensor) -> None:  # the fast loop shares one lengths tensor across layers
        self.derived.lengths = shared

    def prefill(self, key: Tensor, value: Tensor, lengths: Tensor | None = None) -> None:
        """Fill from key, value [B, Hkv, L, d] (L <= Smax); row b holds lengths[b] valid positions
        (all L without lengths). Replaces whatever the cache held."""
        batch, heads, n, _ = key.shape
        if n > self.max_len:
            raise ValueError(f"prefill of {n} positions exceeds the cache capacity {self.max_len}")
        if lengths is None:
            lengths = torch.full((batch,), n, dtype=torch.int32, device=key.device)
        self.key.zero_()
        self.value.zero_()
        self.derived.reset()
        self.write_prefill(key, value, 0, lengths)
        self.finish_prefill()

    def write_prefill(self, key: Tensor, value: Tensor, start: int, lengths: Tensor) -> None:
        """Write prefill positions [start, start + L) of every row from key, value [B, Hkv, L, d]
        (K, Kᵀ if kept, V, the V sum, lengths), for a prefill that runs in chunks (the fast loop).
        Positions at or past lengths[b] are stored as zeros; start == 0 starts a new prefill (V sum
        reset). Afterwards lengths = min(lengths, start + L): the prompt lengths after the last chunk.
        Positions past the chunk keep whatever they held (padding, never read: masked by lengths)."""
        end = start + key.shape[2]
        if end > self.max_len:
            raise ValueError(f"prefill up to position {end} exceeds the cache capacity {self.max_len}")
        lengths = lengths.to(device=self.lengths.device, dtype=torch.int32)
        valid = torch.arange(start, end, device=key.device)[None, :] < lengths[:, None]  # [B, L]
        k = torch.where(valid[:, None, :, None], key.to(self.key.dtype), 0)
        v = torch.where(valid[:, None, :, None], value.to(self.value.dtype), 0)
        self.key[:, :, start:end] = k
        self.value[:, :, start:end] = v
        self.derived.write(k, v, start, valid)
        self.derived.set_runs(lengths.clamp(max=end))

    def append(self, key: Tensor, value: Tensor, positions: Tensor | None = None, advance: bool = True,
               sketch: bool = True) -> None:
        """Write one token per row, key/value [B, Hkv, d] or [B, Hkv, 1, d], at position lengths[b]
        (or positions[b]), then advance lengths (unless advance=False). No host sync. A full row
        (position == Smax) overwrites its last position instead of running past the buffer: keep
        track of the capacity on the host. On CUDA (or under the Triton interpreter) the writes are
        one kernel launch (`kernels.append`). sketch=False skips the kept sketch's append (a method
        that does not read it; `finish_prefill` rebuilds the sketch before one that does)."""
        if key.dim() == 4:
            key = key[:, :, 0]
        if value.dim() == 4:
            value = value[:, :, 0]
        pos_src = self.lengths if positions is None else positions
        if self._fused_append(key):
            from ..kernels.append import append_token

            append_token(key, value, self.key, self.derived.key_t_buf, self.value, self.derived.value_sum, pos_src)
        else:
            self._append_torch(key, value, pos_src)
        if sketch and self.derived.sketch is not None:  # rows are left-aligned: logical = buffer position
            self.derived.append_sketch(key, self.key, pos_src)
        if advance:
            self.lengths.add_((self.lengths < self.max_len).to(torch.int32))

    def _fused_append(self, key: Tensor) -> bool:
        return self._kernel_append and key.device == self.key.device

    def _append_torch(self, key: Tensor, value: Tensor, pos_src: Tensor) -> None:
        batch, heads, d = key.shape
        pos = pos_src.clamp(max=self.max_len - 1).long()
        k = key.to(self.key.dtype).unsqueeze(2)  # [B, H, 1, d]
        v = value.to(self.value.dtype).unsqueeze(2)
        idx_rows = pos.view(batch, 1, 1, 1).expand(batch, heads, 1, d)
        old_v = self.value.gather(2, idx_rows)  # the slot's previous content (0 unless full)
        self.key.scatter_(2, idx_rows, k)
        self.value.scatter_(2, idx_rows, v)
        full = (pos_src >= self.max_len).view(batch, 1, 1).float()
        self.derived.append_column(k[:, :, 0], v[:, :, 0], pos, old_value=full * old_v[:, :, 0].float())
