"""Dense attention: reads all of K and V every step. The baseline every method is compared to."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .base import DecodeInputs, DecodeMethod


@dataclass(frozen=True)
class Dense(DecodeMethod):
    name = "dense"
    graph_safe = True

    def attend(self, x: DecodeInputs) -> Tensor:
        if x.lengths is None:  # padding anywhere: the reference, which never reads it (even NaN)
            return reference.dense_reference(x.query, x.key, x.value, x.valid, x.scale)
        # A prefix of valid positions (the fast loop's static cache, or an unpadded batch), whose
        # tail is finite: PyTorch SDPA with the mask, graph-capturable. Over the static buffer it
        # reads the whole capacity, which is the context plus the new tokens: on the H100 0.97-1.04x
        # the time of SDPA flash and 1.03-1.15x that of cuDNN on an exact-length cache (which would
        # need a shape per length, no single CUDA graph). benchmarks/results/e2e-check-H100.log
        out = F.scaled_dot_product_attention(x.query[:, :, None], x.key, x.value, attn_mask=x.valid[:, None, None],
                                             scale=x.scale, enable_gqa=True)
        return out[:, :, 0]

    def data_fraction(self, length: int, head_dim: int) -> float:
        return 1.0
