"""The selection kernels compile for the H100/H200 (sm_90) on a machine without a GPU.

Triton's CPU interpreter runs the kernels' Python, not their compiled form, so it misses what only
the compiler rejects (e.g. a function whose branches return int32 and int64 keys: such a kernel
passed every interpreter test and failed to build on the H200). Triton's wheel carries ptxas, so
`triton.compile` with a GPUTarget builds the cubin here. Runs in a subprocess: under
TRITON_INTERPRET=1 (set for the rest of the suite) `triton.jit` makes interpreted functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparq.kernels.select import _compact_kernel, _emit_kernel, _sample_kernel

    def build(fn, signature, constexprs, num_warps):
        full = dict(signature)
        full.update({k: "constexpr" for k in constexprs})
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(full.values()) if t.startswith("*")}
        triton.compile(ASTSource(fn, full, constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})

    lists = {n: "*i32" for n in ("k_ptr", "local_ptr")}
    emit = {"logits_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i64", **lists, "state_ptr": "*i64",
            "count64_ptr": "*i64", "idx_ptr": "*i32", "cand_ptr": "*i32", "bits_ptr": "*i32", "tcount_ptr": "*i32",
            "num_kv_heads": "i32", "s_cap": "i32", "k_max": "i32", "n_tiles": "i32"}
    sample = {"logits_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i64", **lists, "state_ptr": "*i64",
              "split_m_ptr": "*fp32", "split_l_ptr": "*fp32", "n_split": "i32", "num_kv_heads": "i32", "s_cap": "i32"}
    compact = {"len_ptr": "*i64", "bits_ptr": "*i32", "tcount_ptr": "*i32", "idx_ptr": "*i32",
               "num_kv_heads": "i32", "k_max": "i32", "n_tiles": "i32"}
    for g in (1, 3, 4):
        gp = triton.next_power_of_2(g)
        for det in (True, False):
            build(_emit_kernel, emit, {"G": g, "G_PAD": gp, "CHUNK": 4096, "BLOCK_S": 1024, "DET": det}, 4)
        build(_sample_kernel, sample, {"G": g, "G_PAD": gp, "NS": 2048, "NS1_PAD": 16, "TOL": 65535, "PIVOTS": 4}, 8)
    build(_compact_kernel, compact, {"CHUNK": 4096, "TILE": 1024, "NT_PAD": 64, "ASM": True}, 4)
    print("compiled")
''')


def test_selection_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("this triton wheel has no ptxas")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
