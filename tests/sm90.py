"""Build Triton kernels for the H100/H200 (sm_90) on a machine without a GPU, for tests.

Triton's CPU interpreter runs a kernel's Python, not its compiled form, so it misses what only the
compiler rejects (e.g. a function whose constexpr branches return int32 and int64 keys passed every
interpreter test and failed to build on the H200). Triton's wheel carries ptxas, so `triton.compile`
with a GPUTarget builds the cubin here. The build runs in a subprocess: under TRITON_INTERPRET=1 (set
for the rest of the suite) `triton.jit` makes interpreted functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, signature, constexprs, num_warps, **opts):
        # constexprs with defaults the caller leaves out (ASTSource needs every parameter)
        constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default
                         and p.name not in constexprs}, **constexprs}
        full = dict(signature)
        full.update({k: "constexpr" for k in constexprs})
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(full.values()) if t.startswith("*")}
        return triton.compile(ASTSource(fn, full, constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, **opts})

    ints = lambda *names: {n: "i32" for n in names}
''')


def compile_for_sm90(script: str) -> None:
    """Run PRELUDE + `script` (which calls `build(...)` and prints "compiled" at the end) in a fresh
    interpreter without TRITON_INTERPRET; skip where the wheel has no ptxas, fail on any build error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], env=env, capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("this triton wheel has no ptxas")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
