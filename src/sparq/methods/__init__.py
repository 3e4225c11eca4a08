"""Decode-time attention methods behind one interface (see `base.DecodeMethod`)."""

from .base import DecodeInputs, DecodeMethod
from .dense import Dense
from .sparq import SparQ

__all__ = ["DecodeInputs", "DecodeMethod", "Dense", "SparQ"]
