"""A Hugging Face cache that also keeps what SparQ needs per layer.

Beside transformers' K and V, each SparQ layer keeps
  * key_t [B, Hkv, d, S]: the keys transposed, so step 1 reads r whole rows (contiguous along
    the sequence) instead of r scattered elements of every key;
  * value_sum [B, Hkv, d] (fp32): the sum of V over valid positions, for step 3's mean;
  * valid [B, S] (bool): which positions are real tokens (left padding is not);
  * starts [B] (int32): where each row's valid run begins, when every row's valid positions are
    one run ending at the newest position (a left-padded batch of `generate`): the kernels then
    read the cache in place with per-row offsets;
  * state: a dict for methods that remember things between steps (H2O).
Kᵀ and the mask live in buffers whose capacity doubles when outgrown, so a decode step writes one
column in place (O(1) per step, amortised) instead of concatenating a new copy. The cache also
owns the kernels' launch plans (`plans`, shared by all layers, sized by a capacity that doubles),
so nothing is planned or allocated per step and everything is freed with the cache.
Memory per position and KV head, beyond transformers' K and V: d * elt bytes for Kᵀ (+50% of the
KV cache at most 2x over-allocated while it grows), 1 byte of mask per row; plus the plans'
workspace, about (4 g + 4.2) bytes per position of capacity (g query heads per KV head).
The extra state is derived data: it is rebuilt from K, V and the attention mask whenever it
does not line up with the cache (after a prefill, crop, reorder or reset), and extended by one
position on an ordinary decode step. So it can never silently disagree with K and V.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from .state import DerivedState, valid_runs


@dataclass
class SparQLayerState:
    derived: DerivedState     # Kᵀ, V sum and valid runs (caches.state: the same code as the static cache)
    valid_buf: Tensor         # [B, capacity] bool: columns [0, length) hold the mask
    length: int
    runs: bool = False        # each row's valid positions are one run ending at the newest one
    left_padded: bool = False  # ...and some row's run starts after position 0
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def key_t(self) -> Tensor | None:
        return self.derived.key_t_upto(self.length)

    @property
    def value_sum(self) -> Tensor:
        return self.derived.value_sum

    @property
    def lengths(self) -> Tensor | None:
        return self.derived.lengths if self.runs else None

    @property
    def starts(self) -> Tensor | None:
        return self.derived.starts if self.runs else None

    @property
    def sketch(self):
        return self.derived.sketch if self.runs else None

    @property
    def valid(self) -> Tensor:
        return self.valid_buf[:, : self.length]

    @property
    def capacity(self) -> int:
        return self.valid_buf.shape[-1]


def build_state(key: Tensor, value: Tensor, valid: Tensor, keep_key_t: bool,
                sketch_spec: tuple[int, int] | None = None) -> SparQLayerState:
    """Everything from scratch: O(S) work, done at prefill or after the cache changed under us."""
    batch, heads, seq_len, head_dim = key.shape
    capacity = seq_len + max(64, seq_len // 4)  # room to decode before the first regrowth
    derived = DerivedState(batch, heads, head_dim, capacity, key.dtype, key.device, keep_key_t=keep_key_t,
                           growable=True, sketch_spec=sketch_spec)
    derived.write(key, value, 0, valid)
    valid_buf = valid.new_zeros(batch, capacity)
    valid_buf[:, :seq_len] = valid
    s = SparQLayerState(derived=derived, valid_buf=valid_buf, length=seq_len)
    runs = valid_runs(valid)  # one host sync per (re)build, none per decode step
    if runs is not None:
        starts, lengths, s.left_padded = runs
        derived.set_runs(lengths, starts)
        s.runs = True
        derived.build_sketch(key)
    else:  # no single valid run per row: the kernels (and the kept sketch) do not apply
        derived.sketch = None
    return s


def extend_state(s: SparQLayerState, key: Tensor, value: Tensor, new_valid: Tensor) -> None:
    """Append the newest position (key/value are the whole cache, the last row is new)."""
    n = s.length
    s.derived.append_column(key[:, :, -1, :], value[:, :, -1, :], n, valid=new_valid)
    if s.runs and s.derived.sketch is not None:  # the new key at its logical position (the run's length)
        s.derived.append_sketch(key[:, :, -1, :], key, s.derived.lengths)
    if s.valid_buf.shape[-1] <= n:  # double the mask's room too (amortised O(1) per step)
        buf = s.valid_buf.new_zeros(s.valid_buf.shape[0], 2 * s.valid_buf.shape[-1])
        buf[:, :n] = s.valid_buf[:, :n]
        s.valid_buf = buf
    s.valid_buf[:, n] = new_valid
    if s.runs:  # decode tokens extend every row's run (generate's attention masks always do; a
        # padding token at the end shortens nothing, but a real token after one would be missed)
        s.derived.lengths += new_valid.to(torch.int32)
    s.length = n + 1


class SparQCache(DynamicCache):
    """DynamicCache plus per-layer SparQ state (see module docstring).

    `sparq.enable` makes `generate` use it automatically; pass one yourself as
    `cache=SparQCache(config=model.config)` (transformers >= 5.24; `past_key_values=` before, see
    `sparq.hf.cache_arg`) when calling the model directly.
    """

    def __init__(self, *args: Any, keep_key_t: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from ..kernels.plans import PlanCache

        self.keep_key_t = keep_key_t
        self.sparq_layers: dict[int, SparQLayerState] = {}
        self.plans = PlanCache(min_capacity=256)  # the kernels' launch plans (all layers)

    def sparq_state(self, layer_idx: int, key: Tensor, value: Tensor, valid: Tensor,
                    rebuild: bool = False, method: Any = None) -> SparQLayerState:
        """The layer's state, lined up with `key`/`value` (the whole cache after this step's update).
        `method` (a DecodeMethod) decides what is kept: Kᵀ if it reads it (`needs_key_t`; always
        without a method), its packed key sketch if it scores with one (`sketch_spec`)."""
        keep_key_t = self.keep_key_t and (method is None or method.needs_key_t)
        sketch_spec = None if method is None else method.sketch_spec
        s = self.sparq_layers.get(layer_idx)
        if s is not None and (s.derived.sketch_spec != sketch_spec or (s.derived.key_t_buf is not None) != keep_key_t):
            s = None  # another method ran on this cache before: derive its state afresh
        # Every operation that rewrites K/V (crop, reorder, reset, batch edits) drops the state
        # and a prefill rebuilds it, so lining up by length and batch is enough: no per-step
        # comparison of masks (that would be a host sync per layer and step on CUDA).
        if not rebuild and s is not None and s.length == key.shape[2] - 1 and s.valid.shape[0] == key.shape[0]:
            extend_state(s, key, value, valid[:, -1])
        else:
            s = build_state(key, value, valid, keep_key_t, sketch_spec)
            self.sparq_layers[layer_idx] = s
        return s

    # Anything that rewrites K/V invalidates the derived state; it is rebuilt on next use.
    def reset(self) -> None:
        super().reset()
        self.sparq_layers.clear()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.sparq_layers.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.sparq_layers.clear()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.sparq_layers.clear()
        self.plans.clear()

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self.sparq_layers.clear()
        self.plans.clear()
