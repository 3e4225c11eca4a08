"""Model families the fast loop runs, by config.model_type. A new family is one file here (a
`Family` subclass: weights per layer, pre/post-attention math) plus its line in `FAMILIES`."""

from __future__ import annotations

from torch import nn

from .base import Family
from .gemma2 import Gemma2
from .gemma3 import Gemma3
from .llama import Llama
from .phi3 import Phi3

FAMILIES: tuple[type[Family], ...] = (Llama, Phi3, Gemma2, Gemma3)


def family_for(model: nn.Module) -> type[Family]:
    """The family class that runs `model`, or a ValueError naming the model and the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = "; ".join(f"{f.name}: {', '.join(f.model_types)}" for f in FAMILIES)
    raise ValueError(f"the fast loop has no model family for {type(model).__name__} (model_type {model_type!r}); "
                     f"supported model types: {supported}")


__all__ = ["FAMILIES", "Family", "Gemma2", "Gemma3", "Llama", "Phi3", "family_for"]
