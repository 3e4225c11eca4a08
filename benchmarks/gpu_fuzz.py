"""Randomised check of `sparq.sparq_attention` against the PyTorch reference over the accepted space.

Every case draws fresh inputs and settings: batch 1-4, KV heads 1-8, group sizes {1,2,3,4,5,8},
head_dim {32,64,80,96,128,256}, S from 1 to ~70000 (log-uniform, odd sizes included), r 1..d+8,
k 1..S+8, local_window 0..k, k_fraction/local_fraction sometimes, both reallocate settings, ragged
lengths, fp16/bf16/fp32. The API runs whatever path it picks (kernels on CUDA fp16/bf16 where they
handle the shape, the reference otherwise); the reference runs in fp32 on the same inputs.

A row (batch entry) passes when its output is within dtype tolerance of the reference. A row that
differs is counted as a *near-tie* when the reference's choice there is decided by a margin below
rounding (r-th vs (r+1)-th |q| weight, or the last kept vs the first dropped selection score of
some KV head): a different but equally valid choice. Near-tie rows must still stay within a bound
(the error is the swapped positions' attention mass times |V|: we require
max|out - ref| <= 0.5 * max|V|). Everything else is a failure; exceptions are failures.

FUZZ_METHOD=sketch fuzzes `sparq-sketch` the same way: bits 1/2, sketch blocks 16-256, fractions
down to k = 1 and up to 1 (dense), local fractions, both reallocate settings, k floors; the layer's
SketchState is prefilled and then appended to for 0 to block + 1 steps (so blocks finish during the
appends), and `SparQSketch.attend` runs with it (the kernels where `sketch_supported`, the PyTorch
path otherwise) against the method's PyTorch path on the same inputs (key_sketch rebuilt from K,
fp32). Near-ties: the last kept vs first dropped selection score (summed over the group).

Writes JSON (device, versions, settings, counts, every failure and near-tie with its case) to
$OUT or benchmarks/results/. Usage: [FUZZ_METHOD=sparq|sketch] [FUZZ_SECONDS=..]
python benchmarks/gpu_fuzz.py [cases] [seed]
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
import traceback

import torch

import sparq
from sparq import reference
from sparq.api import valid_mask
from sparq.kernels.plans import PlanCache

TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 2e-3}
METHOD = os.environ.get("FUZZ_METHOD", "sparq")


def draw(rng: random.Random) -> dict:
    d = rng.choice([32, 64, 80, 96, 128, 256])
    hkv = rng.randint(1, 8)
    g = rng.choice([1, 2, 3, 4, 5, 8])
    b = rng.randint(1, 4)
    # log-uniform S in [1, 70000], a few exact small / power-of-two edges
    u = rng.random()
    if u < 0.08:
        s = rng.randint(1, 8)
    elif u < 0.12:
        s = 2 ** rng.randint(4, 16) + rng.choice([-1, 0, 1])
    else:
        s = int(math.exp(rng.uniform(math.log(2), math.log(70000))))
    s = max(1, s)
    # keep the total size moderate: B * Hkv * S * d elements per tensor <= ~2^28
    while b * hkv * s * d > (1 << 28) and (b > 1 or hkv > 1):
        if b > 1:
            b -= 1
        else:
            hkv -= 1
    r = rng.randint(1, d + 8)
    k = rng.randint(1, s + 8) if rng.random() < 0.7 else max(1, int(s * rng.choice([1 / 4, 1 / 8, 1 / 16])))
    local = rng.randint(0, k) if rng.random() < 0.6 else rng.choice([0, min(1, k), k])
    k_fraction = rng.choice([0.0, 0.0, 1 / 8, 1 / 16, rng.random() * 0.5])
    local_fraction = rng.choice([0.0, 0.0, 0.25, rng.random()])
    dtype = rng.choice([torch.float16, torch.float16, torch.bfloat16, torch.bfloat16, torch.float32])
    ragged = rng.random() < 0.6
    padded = rng.random() < 0.3  # left padding: per-row start offsets
    return dict(padded=padded, plan_cache=rng.random() < 0.5, B=b, Hkv=hkv, g=g, d=d, S=s, r=r, k=k, local_window=local, k_fraction=k_fraction,
                local_fraction=local_fraction, reallocate=rng.random() < 0.5, dtype=str(dtype).split(".")[-1],
                ragged=ragged, zero_query=rng.random() < 0.02)


def near_tie_rows(q, key, valid, cfg, scale) -> torch.Tensor:
    """[B] bool: rows whose reference choice hinges on a margin below rounding."""
    B, Hq, d = q.shape
    hkv = key.shape[1]
    qg = q.float().reshape(B, hkv, Hq // hkv, d)
    w = qg.abs().sum(2)  # [B, Hkv, d]
    tie = torch.zeros(B, dtype=torch.bool, device=q.device)
    if cfg.r < d:
        srt = w.sort(-1, descending=True).values
        gap = (srt[..., cfg.r - 1] - srt[..., cfg.r]).abs()
        tie |= (gap <= 1e-2 * srt[..., :1].squeeze(-1).clamp_min(1e-6)).any(-1)
    s_hat = reference.approx_scores(q, key, valid, cfg.r, scale).sum(2)  # [B, Hkv, S]
    lengths, kb, lb = reference.budgets(cfg, valid)
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)
    cand = valid & ~(from_end <= lb[:, None])
    sc = s_hat.masked_fill(~cand[:, None, :], -1.0).sort(-1, descending=True).values
    for b in range(B):
        need = int(kb[b] - lb[b])
        n_cand = int(cand[b].sum())
        if kb[b] >= lengths[b] or need <= 0 or need >= n_cand:
            continue
        hi, lo = sc[b, :, need - 1], sc[b, :, need]
        if bool(((hi - lo) <= 2e-3 * hi.clamp_min(1e-30) + 1e-7).any()):
            tie[b] = True
    # a selection score that underflows (all mass on a few positions) makes many exact ties at 0
    return tie


def run_case(case: dict, device: str, gen: torch.Generator) -> dict:
    dtype = getattr(torch, case["dtype"])
    B, hkv, g, d, S = case["B"], case["Hkv"], case["g"], case["d"], case["S"]
    hq = hkv * g
    cfg = sparq.SparQConfig(r=case["r"], k=case["k"], local_window=case["local_window"],
                            reallocate=case["reallocate"], k_fraction=case["k_fraction"],
                            local_fraction=case["local_fraction"])
    q = torch.randn(B, hq, d, device=device, generator=gen).to(dtype)
    if case["zero_query"]:
        q[0] = 0
    key = torch.randn(B, hkv, S, d, device=device, generator=gen).to(dtype)
    value = torch.randn(B, hkv, S, d, device=device, generator=gen).to(dtype)
    if case["ragged"]:
        lengths = torch.randint(1, S + 1, (B,), device=device, generator=gen)
        lengths[0] = S
    else:
        lengths = torch.full((B,), S, device=device)
    starts = None
    if case["padded"]:  # left padding: row b valid on [S - lengths[b], S)
        starts = S - lengths
    scale = 1.0 / math.sqrt(d)
    # half the cases through a growing cache's plans (capacity rounded up past S)
    plans = PlanCache() if case["plan_cache"] else None
    out = sparq.sparq_attention(q, key, value, cfg, lengths, starts=starts, plans=plans)
    valid = valid_mask(lengths, B, S, device, starts)
    ref = reference.sparq_reference(q.float(), key.float(), value.float(), cfg, valid, scale)
    return grade(out, ref, value, lambda: near_tie_rows(q, key, valid, cfg, scale))


def grade(out: torch.Tensor, ref: torch.Tensor, value: torch.Tensor, ties, **extra) -> dict:
    """Per row: within tolerance, or a near-tie (ties() [B] bool, asked only when a row differs)
    whose error stays within the bound, or a failure."""
    err = (out.float() - ref).abs().amax(dim=(1, 2))  # [B]
    bad = err > TOL[out.dtype] * (1 + ref.abs().amax(dim=(1, 2)))
    res = dict(rows=out.shape[0], bad_rows=int(bad.sum()), near_ties=0, failures=0, max_err=float(err.max()), **extra)
    if bad.any():
        tie = ties().to(err.device)
        within = err <= 0.5 * value.float().abs().amax(dim=(1, 2, 3))
        res["near_ties"] = int((bad & tie & within).sum())
        res["failures"] = int((bad & ~(tie & within)).sum())
        res["row_err"] = [float(e) for e in err[bad]]
    return res


def draw_sketch(rng: random.Random) -> dict:
    case = draw(rng)
    case.update(bits=rng.choice([1, 2]), block=rng.choice([16, 32, 64, 128, 128, 256]),
                fraction=rng.choice([1 / 8, 1 / 8, 1 / 16, 1 / 4, rng.uniform(1e-4, 0.6), 1.0]),
                local_fraction=rng.choice([0.0, 0.25, 0.25, rng.random()]),
                min_k=rng.choice([1, 4, 16, 64]), appends=rng.choice([0, 0, 1, 3, 17, 300]))
    case["dtype"] = rng.choice(["float16", "bfloat16"]) if rng.random() < 0.9 else "float32"
    return case


def sketch_near_tie_rows(s_hat: torch.Tensor, valid: torch.Tensor, ks: list[int], locals_: list[int]) -> torch.Tensor:
    """[B] bool: rows where the need-th and (need+1)-th candidate scores are within rounding."""
    B = valid.shape[0]
    score = s_hat.sum(2)  # [B, Hkv, S]
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)
    tie = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        n, need = int(valid[b].sum()), ks[b] - locals_[b]
        cand = valid[b] & ~(from_end[b] <= locals_[b])
        n_cand = int(cand.sum())
        if ks[b] >= n or need <= 0 or need >= n_cand:
            continue
        sc = score[b][:, cand].sort(-1, descending=True).values
        hi, lo = sc[:, need - 1], sc[:, need]
        tie[b] = bool(((hi - lo) <= 2e-3 * hi.clamp_min(1e-30) + 1e-7).any())
    return tie


def run_sketch_case(case: dict, device: str, gen: torch.Generator) -> dict:
    from sparq.kernels.sketch_state import SketchState, sketch_supported
    from sparq.methods.base import DecodeInputs
    from sparq.methods.sketch import SparQSketch

    dtype = getattr(torch, case["dtype"])
    B, hkv, g, d, S = case["B"], case["Hkv"], case["g"], case["d"], case["S"]
    m = SparQSketch(case["fraction"], bits=case["bits"], block=case["block"], local_fraction=case["local_fraction"],
                    reallocate=case["reallocate"], min_k=case["min_k"])
    q = torch.randn(B, hkv * g, d, device=device, generator=gen).to(dtype)
    if case["zero_query"]:
        q[0] = 0
    key = torch.randn(B, hkv, S, d, device=device, generator=gen).to(dtype)
    value = torch.randn(B, hkv, S, d, device=device, generator=gen).to(dtype)
    lengths = torch.randint(1, S + 1, (B,), device=device, generator=gen) if case["ragged"] \
        else torch.full((B,), S, device=device)
    lengths[0] = S
    starts = (S - lengths) if case["padded"] else torch.zeros_like(lengths)
    scale = 1.0 / math.sqrt(d)
    valid = valid_mask(lengths, B, S, device, starts if case["padded"] else None)
    sketch = None
    if sketch_supported(d, case["bits"], case["block"], dtype, key.device):
        # prefill all but the last `t` positions of every row, then append them one step at a time
        t = max(0, min(case["appends"], int(lengths.min()) - 1))
        sketch = SketchState(B, hkv, d, S, bits=case["bits"], block=case["block"], dtype=dtype, device=device)
        sketch.prefill(key, lengths - t, starts)
        rows = torch.arange(B, device=device)
        for i in range(t):
            pos = lengths - t + i
            sketch.append(key[rows, :, starts + pos], key, pos, starts if case["padded"] else None)
    plans = PlanCache() if case["plan_cache"] else None
    x = DecodeInputs(q, key, value, valid, scale, lengths=lengths, starts=starts if case["padded"] else None,
                     plans=plans, sketch=sketch)
    out = m.attend(x)
    xr = DecodeInputs(q.float(), key.float(), value.float(), valid, scale)
    ref = m.attend(xr).float()
    ks = [m.k_for(int(n), d) for n in lengths.tolist()]
    return grade(out, ref, value, lambda: sketch_near_tie_rows(m.approx_scores(xr).cpu(), valid.cpu(), ks,
                                                               [m.local_for(k) for k in ks]),
                 kernels=sketch is not None)


def worker(args) -> tuple[dict, list]:
    """Run `cases` cases from `seed` (one process: Triton compiles on its own CPU core)."""
    cases, seed, budget_s = args
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    t0 = time.time()
    counts = dict(cases=0, rows=0, rows_pass=0, near_tie_rows=0, failed_rows=0, exceptions=0, kernel_cases=0, out_of_memory=0)
    problems = []
    for i in range(cases):
        if time.time() - t0 > budget_s:
            print(f"time budget of {budget_s:.0f} s reached after {i} cases", flush=True)
            break
        case = draw_sketch(rng) if METHOD == "sketch" else draw(rng)
        try:
            res = run_sketch_case(case, device, gen) if METHOD == "sketch" else run_case(case, device, gen)
        except Exception as e:  # noqa: BLE001 - the report counts every exception
            if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)):
                counts["exceptions"] += 1
                problems.append(dict(case=case, kind="exception", error=f"{type(e).__name__}: {str(e)[:400]}",
                                     where=traceback.format_exc().splitlines()[-6:]))
                print(f"[{i}] EXCEPTION {case}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            # the harness's own footprint (14 workers on one GPU, fp32 references), not a kernel error
            counts["out_of_memory"] += 1
            problems.append(dict(case=case, kind="out-of-memory", error=str(e)[:200]))
            torch.cuda.empty_cache()
            continue
        counts["cases"] += 1
        torch.cuda.empty_cache()  # give cached blocks back: the workers share one GPU
        counts["kernel_cases"] += int(res.get("kernels", METHOD == "sparq"))
        counts["rows"] += res["rows"]
        counts["rows_pass"] += res["rows"] - res["bad_rows"]
        counts["near_tie_rows"] += res["near_ties"]
        counts["failed_rows"] += res["failures"]
        if res["bad_rows"]:
            kind = "failure" if res["failures"] else "near-tie"
            problems.append(dict(case=case, kind=kind, row_err=res.get("row_err"), max_err=res["max_err"]))
            if res["failures"]:
                print(f"[{i}] FAIL {case} err {res['row_err']}", flush=True)
        if (i + 1) % 50 == 0:
            print(f"seed {seed}: {i + 1} cases, {time.time() - t0:.0f} s: {counts}", flush=True)
    return counts, problems


def main() -> None:
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else int(time.time())
    workers = int(os.environ.get("FUZZ_WORKERS", "1"))
    budget_s = float(os.environ.get("FUZZ_SECONDS", "inf"))  # stop early, report what ran
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    jobs = [(cases // workers + (w < cases % workers), seed * 1000 + w, budget_s) for w in range(workers)]
    if workers == 1:
        results = [worker(jobs[0])]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(worker, jobs)
    counts = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    problems = [p for r in results for p in r[1]]
    total_rows = counts["rows"]
    report = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        versions=dict(torch=torch.__version__, triton=_triton_version(), sparq=sparq.__version__,
                      python=platform.python_version()),
        method=METHOD, seed=seed, workers=workers, requested_cases=cases, wall_s=round(time.time() - t0, 1), counts=counts,
        pass_fraction=(counts["rows_pass"] / total_rows) if total_rows else None,
        pass_or_near_tie_fraction=((counts["rows_pass"] + counts["near_tie_rows"]) / total_rows) if total_rows else None,
        tolerance={str(k).split(".")[-1]: v for k, v in TOL.items()},
        near_tie_bound="max|out-ref| <= 0.5 * max|V| on rows whose reference choice hinges on a margin below rounding",
        problems=problems,
    )
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    tag = (report["device"] or "cpu").replace(" ", "_")
    path = os.path.join(out_dir, f"gpu-fuzz{'-sketch' if METHOD == 'sketch' else ''}-{tag}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("device", "versions", "seed", "wall_s", "counts", "pass_fraction",
                                              "pass_or_near_tie_fraction")}, indent=1))
    print("->", path)


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
