"""Gemma 2 (model_type gemma2): Gemma's layer (`gemma.py`; no QK-norm, one rotary table), with
attention logits soft-capped on every layer: scores -> tanh(scores / cap) * cap before the softmax
(`attn_logit_softcapping`, 50 in the released models).

No decode method implements soft-capping (`sparq.enable` refuses Gemma 2 for that reason), and
every Gemma 2 layer has it, so the loop runs Gemma 2 with `Dense()` only: dense soft-capped
attention on every layer (a ring on the sliding-window ones), exact to transformers' eager path;
any other method is refused before any work (`FastDecoder`) rather than silently run as dense."""

from __future__ import annotations

from .gemma import Gemma


class Gemma2(Gemma):
    name = "gemma2"
    model_types = ("gemma2",)
