"""The selection kernels and the sketch scorer compile for the H100/H200 (sm_90) on a machine without
a GPU (tests/sm90.py says why: the interpreter does not compile; the selection test fails on a kernel
that once passed every interpreter test and did not build on the H200, the scorer test on a malformed
inline PTX instruction, which the interpreter never runs)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from sm90 import compile_for_sm90  # noqa: E402

SCRIPT = '''
    from sparq.kernels.select import _compact_kernel, _emit_kernel, _sample_kernel

    lists = {n: "*i32" for n in ("k_ptr", "local_ptr")}
    emit = {"logits_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i64", **lists, "state_ptr": "*i64",
            "count64_ptr": "*i64", "idx_ptr": "*i32", "cand_ptr": "*i32", "ckey_ptr": "*i32", "bits_ptr": "*i32",
            "tcount_ptr": "*i32",
            **ints("num_kv_heads", "s_cap", "k_max", "n_tiles")}
    sample = {"smp_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i64", "table_ptr": "*i32", **lists,
              "count_ptr": "*i32", "state_ptr": "*i64",
              "split_m_ptr": "*fp32", "split_l_ptr": "*fp32", **ints("n_split", "num_kv_heads", "n_smp", "smp_step")}
    compact = {"len_ptr": "*i64", "bits_ptr": "*i32", "tcount_ptr": "*i32", "idx_ptr": "*i32",
               **ints("num_kv_heads", "k_max", "n_tiles")}
    for g in (1, 3, 4):
        gp = triton.next_power_of_2(g)
        for det in (True, False):
            # with the plan's register cap (dispatch: 64 for g <= 4)
            build(_emit_kernel, emit, {"G": g, "G_PAD": gp, "CHUNK": 4096, "BLOCK_S": 1024, "DET": det}, 4, maxnreg=64)
        build(_sample_kernel, sample, {"G": g, "G_PAD": gp, "NS": 2048, "STRIDE": 16, "NS1_PAD": 16, "TOL": 65535,
                                             "PIVOTS": 4}, 8)
    build(_compact_kernel, compact, {"CHUNK": 4096, "TILE": 1024, "NT_PAD": 64, "ASM": True}, 4)
    print("compiled")
'''


def test_selection_kernels_compile_for_sm90():
    compile_for_sm90(SCRIPT)


SCORER = '''
    from sparq.kernels.sketch_scores import _sketch_scores_kernel

    def scores(t):
        return {"q_ptr": f"*{t}", "codes_ptr": "*i32", "lo_ptr": f"*{t}", "hi_ptr": f"*{t}", "key_ptr": f"*{t}",
                "len_ptr": "*i32", "starts_ptr": "*i32", "slots_ptr": "*i32", "logits_ptr": "*fp32",
                "m_ptr": "*fp32", "l_ptr": "*fp32", "smp_ptr": "*fp32",
                **ints("stride_kb", "stride_kh", "stride_ks", "num_kv_heads", "s_cap", "code_cap", "n_blk_cap",
                       "n_split", "n_smp"),
                "scale": "fp32"}

    # (g, d, bits, dtype, tile): mma.sync with B computed in its [d, 2g] shape (g <= 4), the wgmma column
    # order (g = 8, d * bits >= 128), words shared by lanes (d * bits < 128), the 64-position tile at d = 256
    for g, d, bits, t, tile in ((1, 128, 2, "fp16", 128), (4, 64, 1, "bf16", 128), (8, 128, 2, "bf16", 128),
                                (8, 256, 2, "bf16", 64), (1, 256, 1, "fp16", 128)):
        gq = max(4, triton.next_power_of_2(g))
        build(_sketch_scores_kernel, scores(t), {"G": g, "G_PAD": max(16, gq), "GQ": gq, "D": d, "BITS": bits,
                                                 "BLOCK": 128, "CHUNK": 1024, "BLOCK_S": tile, "HAS_STARTS": False,
                                                 "HAS_SLOTS": False, "SPLIT_C": 2, "SPLIT_K": 3 if t == "bf16" else 2,
                                                 "STATS": g > 1, "ASM": True, "SMP_SHIFT": 4}, 4, num_stages=2,
              **({"maxnreg": 72} if 2 <= g <= 4 and d <= 128 else {}))  # the plan's register cap
    print("compiled")
'''


def test_sketch_scorer_compiles_for_sm90():
    """The sketch scorer's constexpr paths build for sm_90: the interpreter runs none of its inline PTX
    or layout choices (the scorer's 2026-11-30 rewrites changed both)."""
    compile_for_sm90(SCORER)


PDL_CHAIN = '''
    import re
    from sparq.kernels.select import _budgets_kernel, _emit_kernel, _resolve_kernel

    lists = {n: "*i32" for n in ("k_ptr", "local_ptr")}
    budgets = {"len_ptr": "*i32", "table_ptr": "*i32", **lists, "count_ptr": "*i32", **ints("num_kv_heads")}
    emit = {"logits_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i32", **lists, "state_ptr": "*i64",
            "count64_ptr": "*i64", "idx_ptr": "*i32", "cand_ptr": "*i32", "ckey_ptr": "*i32", "bits_ptr": "*i32",
            "tcount_ptr": "*i32", **ints("num_kv_heads", "s_cap", "k_max", "n_tiles")}
    resolve = {"logits_ptr": "*fp32", "logz_ptr": "*fp32", "len_ptr": "*i32", **lists, "state_ptr": "*i64",
               "count_ptr": "*i32", "idx_ptr": "*i32", "cand_ptr": "*i32", "ckey_ptr": "*i32", "bits_ptr": "*i32",
               "tcount_ptr": "*i32", **ints("num_kv_heads", "s_cap", "k_max", "n_tiles")}
    builds = {
        "budgets": (_budgets_kernel, budgets, {"H2_PAD": 16}, 1),
        "emit": (_emit_kernel, emit, {"G": 4, "G_PAD": 4, "CHUNK": 4096, "BLOCK_S": 1024, "DET": True}, 4),
        "resolve": (_resolve_kernel, resolve, {"G": 4, "G_PAD": 4, "CAP": 4096, "BLOCK": 1024, "PIVOTS": 4,
                                               "PIVOTS_MEM": 4, "TILE": 1024, "DET": True, "CKEYS": True}, 16),
    }
    for name, (fn, sig, const, warps) in builds.items():
        ptx = build(fn, sig, {**const, "PDL": True}, warps, launch_pdl=True).asm["ptx"]
        body = ptx[ptx.index(".entry"):]
        wait = body.find("griddepcontrol.wait")
        first_mem = min(i for i in (body.find("ld.global"), body.find("st.global"), body.find("atom.global")) if i >= 0)
        assert 0 <= wait < first_mem, f"{name}: griddepcontrol.wait at {wait}, first global access at {first_mem}"
        assert "griddepcontrol.launch_dependents" in body, name
        plain = build(fn, sig, {**const, "PDL": False}, warps).asm["ptx"]
        assert "griddepcontrol" not in plain, name
    print("compiled")
'''


TAIL = '''
    from sparq.kernels.sketch_state import _tail_codes_kernel

    for d, bits, block, t, rows, warps in ((128, 2, 128, "bf16", "i64", 8), (64, 1, 16, "fp16", "i32", 4),
                                           (256, 2, 64, "bf16", "i64", 8)):
        build(_tail_codes_kernel, {"key_ptr": f"*{t}", "rows_ptr": f"*{rows}", "len_ptr": "*i32",
                                   "codes_ptr": "*i32", "lo_ptr": f"*{t}", "hi_ptr": f"*{t}",
                                   **ints("stride_kr", "stride_kh", "num_kv_heads", "cap", "n_blk")},
              {"D": d, "BITS": bits, "BLOCK": block}, warps)
    print("compiled")
'''


def test_tail_codes_kernel_compiles_for_sm90():
    """Serving's step-sketch tail (`code_tail`): the default 128-position block at d = 128, a small block
    with 1-bit codes and int32 slot rows, d = 256."""
    compile_for_sm90(TAIL)


def test_pdl_kernels_wait_before_any_global_access():
    """With PDL each kernel's first device instruction on memory comes after griddepcontrol.wait (pdl.py's
    contract: a kernel may launch while its predecessor still writes what it reads); without PDL the
    kernels have no griddepcontrol at all."""
    compile_for_sm90(PDL_CHAIN)
