"""The selection kernels compile for the H100/H200 (sm_90) on a machine without a GPU (tests/sm90.py
says why: the interpreter does not compile; this test fails on a kernel that once passed every
interpreter test and did not build on the H200)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from sm90 import compile_for_sm90  # noqa: E402

SCRIPT = '''
    from sparq.kernels.select import _compact_kernel, _emit_kernel, _sample_kernel

    lists = {n: "*i32" for n in ("k_ptr", "local_ptr")}
    emit = {"logits_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i64", **lists, "state_ptr": "*i64",
            "count64_ptr": "*i64", "idx_ptr": "*i32", "cand_ptr": "*i32", "bits_ptr": "*i32", "tcount_ptr": "*i32",
            **ints("num_kv_heads", "s_cap", "k_max", "n_tiles")}
    sample = {"logits_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i64", **lists, "state_ptr": "*i64",
              "split_m_ptr": "*fp32", "split_l_ptr": "*fp32", **ints("n_split", "num_kv_heads", "s_cap")}
    compact = {"len_ptr": "*i64", "bits_ptr": "*i32", "tcount_ptr": "*i32", "idx_ptr": "*i32",
               **ints("num_kv_heads", "k_max", "n_tiles")}
    for g in (1, 3, 4):
        gp = triton.next_power_of_2(g)
        for det in (True, False):
            build(_emit_kernel, emit, {"G": g, "G_PAD": gp, "CHUNK": 4096, "BLOCK_S": 1024, "DET": det}, 4)
        build(_sample_kernel, sample, {"G": g, "G_PAD": gp, "NS": 2048, "NS1_PAD": 16, "TOL": 65535, "PIVOTS": 4}, 8)
    build(_compact_kernel, compact, {"CHUNK": 4096, "TILE": 1024, "NT_PAD": 64, "ASM": True}, 4)
    print("compiled")
'''


def test_selection_kernels_compile_for_sm90():
    compile_for_sm90(SCRIPT)
