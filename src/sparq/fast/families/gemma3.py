"""Gemma 3 text models (model_type gemma3_text, e.g. gemma-3-270m, gemma-3-1b): Gemma's layer
(`gemma.py`) with q and k RMS-normalised per head (QK-norm) before rotary, and a rotary table of
their own (another base frequency) for the sliding-window layers."""

from __future__ import annotations

from torch import Tensor

from .gemma import Gemma


class Gemma3(Gemma):
    name = "gemma3"
    model_types = ("gemma3_text",)

    def rotary(self, x: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        # one rotary table per layer type (the sliding layers have their own base frequency)
        types = list(self.config.layer_types)
        by_type = {t: self.inner.rotary_emb(x, positions, t) for t in dict.fromkeys(types)}
        return [by_type[t] for t in types]
