"""Decode-time attention methods behind one interface (see `base.DecodeMethod`)."""

from .base import DecodeInputs, DecodeMethod
from .dense import Dense
from .h2o import H2O
from .quest import Quest
from .registry import DEFAULT_SPEC, METHODS, budget_label, build_method, default_method, parse_budget, parse_spec
from .sketch import SparQSketch
from .sparq import SparQ
from .streaming import Streaming
from .topk import TopK

__all__ = [
    "DecodeInputs", "DecodeMethod", "Dense", "SparQ", "SparQSketch", "Streaming", "H2O", "Quest", "TopK",
    "DEFAULT_SPEC", "METHODS", "budget_label", "build_method", "default_method", "parse_budget", "parse_spec",
]
