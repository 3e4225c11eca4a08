"""The interface every decode-time attention method shares (dense, SparQ and the baselines).

A method is a small frozen dataclass with two jobs:
  * `attend`: one decode step of attention for one layer, from the whole cache;
  * `data_fraction`: the K/V data that step reads, as a fraction of dense attention's,
    counted the paper's way (elements of K and V, index and metadata reads included).
Methods that remember something between steps (H2O's accumulated scores, say) keep it in
`DecodeInputs.state`, a dict owned by the cache layer and dropped when the cache is cropped,
reordered or reset.

Both decode loops build a `DecodeInputs` per layer and call `attend`: the Hugging Face path over
the whole (possibly left-padded) cache with a `valid` mask, the fast loop (`sparq.fast`) over a
static, preallocated cache whose rows are left-aligned (valid = position < lengths[b], S = its
capacity). Three class flags tell the fast loop what a method needs from that static cache:
  * `static_cache`: attend works there at all (False: the fast loop refuses the method);
  * `needs_key_t`: it reads `key_t`, so the static cache keeps a transposed copy of K
    (`value_sum` and `lengths` are always there: d fp32 per head, written by the same append);
  * `graph_safe`: over the static cache, attend has static shapes and no host synchronisation,
    so a decode step running it can be captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class DecodeInputs:
    """One layer's decode step. query [B, Hq, d]; key, value [B, Hkv, S, d]; valid [B, S] bool.

    key_t [B, Hkv, d, S] (keys contiguous along the sequence) and value_sum [B, Hkv, d] (fp32
    sum of V over valid positions) are present when the cache keeps them; lengths [B] (and starts
    [B] for a left-padded cache) too when the valid positions of row b are one contiguous run
    [starts[b], starts[b] + lengths[b]), which lets CUDA tensors run on the kernels. `plans` is the
    cache's `sparq.kernels.dispatch.PlanCache`: kernel launch plans and workspaces owned by the
    cache, shared by its layers, freed with it.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    valid: Tensor
    scale: float
    key_t: Tensor | None = None
    value_sum: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)
    lengths: Tensor | None = None  # set when valid is exactly `starts[b] <= position < starts[b] + lengths[b]`
    starts: Tensor | None = None   # None: every row starts at position 0
    plans: Any = None              # the cache's PlanCache (None: the kernels plan per call)
    sketch: Any = None             # the cache's packed key sketch (kernels.sketch_state.SketchState)


@dataclass(frozen=True)
class DecodeMethod(ABC):
    """Base class: subclasses set `name` and implement `attend` and `data_fraction`."""

    name: ClassVar[str] = "method"
    static_cache: ClassVar[bool] = True
    needs_key_t: ClassVar[bool] = False
    graph_safe: ClassVar[bool] = False
    # (bits, block) of the packed key sketch the caches keep for the method (None: no sketch)
    sketch_spec: ClassVar[tuple[int, int] | None] = None

    def graph_safe_for(self, dtype: torch.dtype, head_dim: int) -> bool:
        """`graph_safe` for a CUDA cache of this dtype and head dim (a method whose kernels cover only
        some of them falls back to a reference with host syncs elsewhere, which a graph cannot hold)."""
        return self.graph_safe

    @abstractmethod
    def attend(self, x: DecodeInputs) -> Tensor:
        """Attention output [B, Hq, d] in the query's dtype."""

    @abstractmethod
    def data_fraction(self, length: int, head_dim: int) -> float:
        """K/V elements read per KV head and step, over dense attention's 2 * length * head_dim."""

    def observe_prefill(self, query: Tensor, key: Tensor, value: Tensor, valid: Tensor, scale: float,
                        state: dict[str, Any]) -> None:
        """Called after a dense prefill (query [B, Hq, L, d]); stateless methods ignore it."""

    @property
    def label(self) -> str:
        """Short human-readable description used in tables and plots."""
        return self.name
