"""SparQ attention exactly as in the paper (the reference semantics in `sparq.reference`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import reference
from ..api import sparq_attention
from ..config import SparQConfig
from .base import DecodeInputs, DecodeMethod


@dataclass(frozen=True)
class SparQ(DecodeMethod):
    config: SparQConfig
    name = "sparq"
    needs_key_t = True  # step 1 reads r whole rows of Kᵀ (contiguous along the sequence)
    graph_safe = True  # on the kernels (CUDA fp16/bf16): fixed launch shapes, no host sync

    def attend(self, x: DecodeInputs) -> Tensor:
        if x.query.is_cuda and x.lengths is not None:
            # the one entry to the Triton kernels (fp16/bf16; the API falls back to the reference
            # otherwise), for the Hugging Face cache and the fast loop's static cache alike
            return sparq_attention(x.query, x.key, x.value, self.config, x.lengths, scale=x.scale,
                                   key_t=x.key_t, value_sum=x.value_sum, starts=x.starts, plans=x.plans,
                                   validate=False)
        return reference.sparq_reference(
            x.query, x.key, x.value, self.config, x.valid, x.scale, key_t=x.key_t, value_sum=x.value_sum
        )

    def graph_safe_for(self, dtype: torch.dtype, head_dim: int) -> bool:
        from ..kernels import SUPPORTED_HEAD_DIMS  # the kernels: fp16/bf16 and these head dims

        return dtype in (torch.float16, torch.bfloat16) and head_dim in SUPPORTED_HEAD_DIMS

    def data_fraction(self, length: int, head_dim: int) -> float:
        return self.config.data_fraction(length, head_dim)

    @property
    def label(self) -> str:
        c = self.config
        k = f"max({c.k},{c.k_fraction:g}S)" if c.k_fraction else str(c.k)
        return f"sparq(r={c.r}, k={k}{'' if c.reallocate else ', no realloc'})"
