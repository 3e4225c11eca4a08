"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's chain of kernels.

The step is seven or eight dependent launches per layer. Launched plainly, each kernel starts only after the
previous one has finished and its launch has gone through the front end: ~1.3 us of idle GPU per
launch at batch 1, where the whole step is ~56 us on the H200 (KERNEL_NOTES.md). With PDL
(`launch_pdl=True`, CUDA's programmatic stream serialization, kept by CUDA graph capture) a kernel
may be launched while its predecessor still runs; its blocks wait in `griddepcontrol.wait` until
the predecessor has completed and its writes are visible, so the launch latency overlaps the
predecessor's tail instead of following it.

Contract, for every kernel launched with PDL: `wait_for_previous(PDL)` is the FIRST statement, run
by every program, before any load or store. That makes each kernel's completion imply its
predecessor's, so a kernel reading what two launches back wrote is still correct. The call also
lets the next kernel launch once all of this kernel's programs have started (a hint; the next
kernel still waits for this one to complete). Moves no bytes.

Measured on the H200 (whole graphed step, sketch-sweep-NVIDIA_H200-20261201T014447Z.json) PDL was not
faster: 5% slower at GQA B1 32k, 3% at MHA B1 4k, 4% faster at GQA B1 128k, within 1% on the large
shapes; `dispatch.Tuning.pdl` is off by default and kept for such A/Bs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    _HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


def _launch_option_exists() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # pragma: no cover - no NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_supported(device: torch.device | str) -> bool:
    """Can kernels on `device` be launched with PDL: a CUDA device of compute capability >= 9.0
    (griddepcontrol is sm_90+ PTX), not the interpreter, a Triton with the launch option."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting() or not _HAVE_GDC or not _launch_option_exists():
        return False
    try:
        return torch.cuda.get_device_capability(device)[0] >= 9
    except Exception:  # pragma: no cover
        return False


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel in the stream has completed (its writes visible),
    then let the next one launch. Without: nothing (the launch itself serialises)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
