"""Compile the sketch kernels for sm_90 on a machine WITHOUT a GPU and print their instruction mix.

Triton's wheel carries ptxas, cuobjdump and nvdisasm, so `triton.compile` with a GPUTarget builds
the H100/H200 binary anywhere: a compile check of the GPU path (the CPU interpreter skips it) and a
static cost model (registers, shared memory, SASS opcodes of the whole kernel). Pointer arguments
and the row lengths / strides are marked divisible by 16, as the JIT specialises them at run time.

Usage: PYTHONPATH=src python benchmarks/sketch_sass.py [--bits 2] [--g 4] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def build(fn, signature: dict, constexprs: dict, num_warps: int, divisible: tuple[str, ...], **opts):
    full = dict(signature)
    full.update({k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(full.items())
             if t.startswith("*") or n in divisible}
    return triton.compile(ASTSource(fn, full, constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, **opts})


def report(name: str, kernel) -> None:
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    ops = [m[1] for m in re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.M)]
    regs = re.search(r"REG:(\d+)", res)
    print(f"{name}: {regs.group(1) if regs else '?'} registers, {kernel.metadata.shared} B shared, {len(ops)} SASS "
          f"instructions; most common: {collections.Counter(ops).most_common(10)}")
    for start, end, body in mma_loops(sass):
        print(f"  MMA loop {start:#x}-{end:#x}: {len(body)} instructions; "
              f"{collections.Counter(o.split('.')[0] for o in body).most_common(16)}")
    return sass


def mma_loops(sass: str):
    """(start, end, opcodes) of each loop (a label and a later backward branch to it) holding an MMA."""
    lines = sass.splitlines()
    ins, labels = [], {}
    for i, line in enumerate(lines):
        m = re.match(r"^\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ins.append((int(m[1], 16), m[3], m[4]))
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            for nxt in lines[i + 1:]:
                a = re.match(r"^\s+/\*([0-9a-f]{4})\*/", nxt)
                if a:
                    labels[m[1]] = int(a[1], 16)
                    break
    out = []
    for a, op, rest in ins:
        m = re.search(r"`\((\.L_x_\d+)\)", rest) if op.startswith("BRA") else None
        if m and labels.get(m[1], a) < a:
            body = [o for (b, o, _) in ins if labels[m[1]] <= b <= a]
            if any(o.startswith(("HMMA", "HGMMA")) for o in body):
                out.append((labels[m[1]], a, body))
    return out


def main() -> None:
    from sparq.kernels.sketch_scores import _sketch_scores_kernel
    from sparq.kernels.sketch_state import _sketch_append_kernel

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--g", type=int, default=4)
    ap.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--stats", type=int, default=1, help="1: split statistics on (g > 1 or reallocation)")
    ap.add_argument("--sass", default="", help="write the scorer's SASS to this file")
    ap.add_argument("--block-s", type=int, default=0, help="scorer tile (0: as sketch_block_s)")
    ap.add_argument("--stages", type=int, default=2, help="software-pipelining stages (Tuning.sketch_stages)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap per thread (0: the compiler's choice)")
    ap.add_argument("--smp-shift", type=int, default=4, help="log2 of the selection's sample stride (0: no copy)")
    ap.add_argument("--no-append", action="store_true", help="skip the append kernel")
    args = ap.parse_args()
    t = args.dtype
    sig = {"q_ptr": f"*{t}", "codes_ptr": "*i32", "lo_ptr": f"*{t}", "hi_ptr": f"*{t}", "key_ptr": f"*{t}",
           "len_ptr": "*i32", "starts_ptr": "*i32", "slots_ptr": "*i32", "logits_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
           "smp_ptr": "*fp32", "stride_kb": "i64", "stride_kh": "i64", "stride_ks": "i32", "num_kv_heads": "i32",
           "s_cap": "i32", "code_cap": "i32", "n_blk_cap": "i32", "n_split": "i32", "n_smp": "i32", "scale": "fp32"}
    const = dict(G=args.g, G_PAD=max(16, triton.next_power_of_2(args.g)), GQ=max(4, triton.next_power_of_2(args.g)),
                 D=args.d, BITS=args.bits, BLOCK=128, CHUNK=4096,
                 BLOCK_S=args.block_s or (64 if args.d > 128 and args.g >= 8 else 128),  # as sketch_block_s
                 HAS_STARTS=False, HAS_SLOTS=False, SPLIT_C=2, SPLIT_K=3 if t == "bf16" else 2, STATS=args.stats,
                 ASM=True, SMP_SHIFT=args.smp_shift)  # as score_sketch launches it
    sass = report(f"_sketch_scores_kernel g={args.g} {args.bits} bit d={args.d} {t}",
                  build(_sketch_scores_kernel, sig, const, args.warps, ("s_cap", "code_cap", "stride_kb", "stride_kh", "stride_ks"),
                        num_stages=args.stages, **({"maxnreg": args.maxnreg} if args.maxnreg else {})))
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(sass)
    if args.no_append:
        return
    sig = {"knew_ptr": f"*{t}", "key_ptr": f"*{t}", "codes_ptr": "*i32", "lo_ptr": f"*{t}", "hi_ptr": f"*{t}",
           "pos_ptr": "*i32", "starts_ptr": "*i32", "stride_nb": "i32", "stride_nh": "i32", "stride_kb": "i64",
           "stride_kh": "i64", "stride_ks": "i32", "num_kv_heads": "i32", "s_cap": "i32", "n_blk_cap": "i32"}
    report(f"_sketch_append_kernel {args.bits} bit d={args.d} block 128",
           build(_sketch_append_kernel, sig, dict(D=args.d, BITS=args.bits, BLOCK=128, HAS_STARTS=True), 8,
                 ("stride_kb", "stride_kh", "stride_ks")))


if __name__ == "__main__":
    main()
