"""Triton kernels for the SparQ decode step.

Importing this package never raises: without triton, or without a GPU driver, `available()`
says False and the public API keeps using the PyTorch reference. The kernels themselves live
in the submodules (imported lazily by `dispatch`):

- approx_scores    step 1: the swappable approximate scorer (transposed-key implementation).
- select           step 2a: budgets, histogram/radix threshold selection of the kept positions.
- gather_attention step 2b + 3: split-K attention over the kept rows, combine with reallocation.
- dispatch         workspace planning and the launch sequence (no math).
"""

from __future__ import annotations

import os

__all__ = ["available", "interpreting", "triton_importable", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # power-of-two head sizes the kernels are built for


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def available(device=None) -> bool:
    """Can the kernels run on tensors of `device` (a torch.device, a string or None = cuda)?

    CUDA tensors need triton and a working CUDA driver; CPU tensors need the interpreter.
    """
    try:
        import torch
    except Exception:  # pragma: no cover
        return False
    if not triton_importable():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type == "cuda":
        try:
            return bool(torch.cuda.is_available()) and not interpreting()
        except Exception:  # pragma: no cover
            return False
    return dev.type == "cpu" and interpreting()
