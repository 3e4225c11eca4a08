"""A Hugging Face cache that also keeps what SparQ needs per layer.

Beside transformers' K and V, each SparQ layer keeps
  * key_t [B, Hkv, d, S]: the keys transposed, so step 1 reads r whole rows (contiguous along
    the sequence) instead of r scattered elements of every key;
  * value_sum [B, Hkv, d] (fp32): the sum of V over valid positions, for step 3's mean;
  * valid [B, S] (bool): which positions are real tokens (left padding is not);
  * state: a dict for methods that remember things between steps (H2O).
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


@dataclass
class SparQLayerState:
    key_t: Tensor | None
    value_sum: Tensor
    valid: Tensor
    no_padding: bool = False  # every position valid: the kernels can take plain lengths
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.valid.shape[-1]


def build_state(key: Tensor, value: Tensor, valid: Tensor, keep_key_t: bool) -> SparQLayerState:
    """Everything from scratch: O(S) work, done at prefill or after the cache changed under us."""
    value_sum = value.float().masked_fill(~valid[:, None, :, None], 0.0).sum(2)
    key_t = key.transpose(-1, -2).contiguous() if keep_key_t else None
    # One host sync per (re)build, none per decode step: decode tokens are always valid.
    return SparQLayerState(key_t=key_t, value_sum=value_sum, valid=valid.clone(), no_padding=bool(valid.all()))


def extend_state(s: SparQLayerState, key: Tensor, value: Tensor, new_valid: Tensor) -> None:
    """Append the newest position (key/value are the whole cache, the last row is new)."""
    if s.key_t is not None:
        s.key_t = torch.cat([s.key_t, key[:, :, -1:, :].transpose(-1, -2)], dim=-1)
    s.value_sum += value[:, :, -1, :].float().masked_fill(~new_valid[:, None, None], 0.0)
    s.valid = torch.cat([s.valid, new_valid[:, None]], dim=-1)


class SparQCache(DynamicCache):
    """DynamicCache plus per-layer SparQ state (see module docstring).

    `sparq.enable` makes `generate` use it automatically; pass one yourself as
    `cache=SparQCache(config=model.config)` (transformers >= 5.24; `past_key_values=` before, see
    `sparq.hf.cache_arg`) when calling the model directly.
    """

    def __init__(self, *args: Any, keep_key_t: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_key_t = keep_key_t
        self.sparq_layers: dict[int, SparQLayerState] = {}

    def sparq_state(self, layer_idx: int, key: Tensor, value: Tensor, valid: Tensor,
                    rebuild: bool = False) -> SparQLayerState:
        """The layer's state, lined up with `key`/`value` (the whole cache after this step's update)."""
        s = self.sparq_layers.get(layer_idx)
        # Every operation that rewrites K/V (crop, reorder, reset, batch edits) drops the state
        # and a prefill rebuilds it, so lining up by length and batch is enough: no per-step
        # comparison of masks (that would be a host sync per layer and step on CUDA).
        if not rebuild and s is not None and s.length == key.shape[2] - 1 and s.valid.shape[0] == key.shape[0]:
            extend_state(s, key, value, valid[:, -1])
        else:
            s = build_state(key, value, valid, self.keep_key_t)
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

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self.sparq_layers.clear()
