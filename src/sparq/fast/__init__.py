"""The fast decode loop (gpt-fast style): `decoder.py` runs the loop (prefill, decode step, CUDA
graphs, autotune, tensor parallelism) over a static cache with any `DecodeMethod` that has a
static-cache path; `families/` holds each model family's math behind one small adapter
(`families/base.Family`: a new family is one file there); `window.py` is the ring a sliding-window
layer keeps; `attention.py` the dense attention the loop runs itself (prefill, soft-capped layers)."""

from .decoder import DecodeTimings, FastDecoder, fast_generate, kv_bytes_per_token, left_align, static_method
from .families import FAMILIES, Family, family_for

__all__ = ["DecodeTimings", "FastDecoder", "fast_generate", "kv_bytes_per_token", "left_align", "static_method",
           "FAMILIES", "Family", "family_for"]
