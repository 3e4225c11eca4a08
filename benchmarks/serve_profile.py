"""Where a continuous-batching step's time goes: dense ("paged|sdpa") against SparQ ("paged|sparq").

`sparq bench serve` reports what a server delivers (tokens/s over the whole run, TPOT, TTFT); this
says why. Per variant, over the same requests and the same `ContinuousBatchingConfig` as bench serve:
  * every forward pass of the model is timed by hooks: host time between the starts of consecutive
    passes (the step as the server sees it), host time inside the pass (dispatch: the Python and
    launch work before `forward` returns), and device time from a CUDA event at its start to one at its
    end (which includes any time the device waited for the host); passes are labelled decode-only or
    with prefill tokens from their shapes (`bench_serve.pass_shape`: no device read);
  * `--kind prefill`: the window and cProfile cover passes with prefill tokens instead;
  * `--host-steps M`: cProfile over the M passes of that kind after the window (the thread that runs the
    model: its Python functions, torch calls and host waits, per pass);
  * `--profile-steps N`: the kernels of N consecutive decode-only passes (from the first one; torch.profiler
    records CUDA activity over the whole call, from the main thread, and the hooks launch a marker kernel
    at both ends of the window, synchronized): the sum of kernel time against the window's wall time (how
    busy the device is), kernel time per category and the largest kernels. The profiler is attached for
    the whole timed call (N = 0: no profiler), so the pass timings include its small per-launch cost.
Run on the device machine (transformers 5.17 / 5.18):
    PYTHONPATH=src python benchmarks/serve_profile.py --requests 16 --min-prompt 16384 --max-prompt 16384 \
        --new-tokens 48 --cache-gib 40 --profile-steps 12
Writes benchmarks/results/serve-profile-<device>-<stamp>.json.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_step import category  # noqa: E402

from sparq.tools.bench_serve import pass_shape  # noqa: E402


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class StepTimer:
    """Forward hooks on the model: per pass host start / end, CUDA events, decode-only or not; optionally
    a torch.profiler window over the first `profile_steps` decode-only passes."""

    def __init__(self, model: torch.nn.Module, profile_steps: int, host_steps: int = 0, kind: str = "decode") -> None:
        self.kind = kind  # which passes the kernel window and cProfile cover: "decode" (decode-only) or "prefill"
        self.passes: list[dict] = []
        self.profile_steps = profile_steps
        self.host_steps = host_steps  # cProfile over this many decode-only passes after the kernel window
        self.host = cProfile.Profile() if host_steps else None
        self._hosted = 0
        self._host_on = False
        self.window: dict = {}
        self._profiled = 0
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        tokens, requests = pass_shape(args, kwargs)
        decode_only = tokens == requests
        if self.window.get("open") and self._profiled >= self.profile_steps:  # close the window first
            torch.cuda.synchronize()
            self.window["wall_s"] = time.perf_counter() - self.window["t0"]
            torch.cuda._sleep(1)  # marker kernel: the window's kernels lie between the two markers
            self.window.update(open=False, passes=self._profiled)
        chosen = decode_only if self.kind == "decode" else not decode_only
        if chosen and self.profile_steps and not self.window:
            torch.cuda.synchronize()
            torch.cuda._sleep(1)
            torch.cuda.synchronize()
            self.window.update(open=True, t0=time.perf_counter())
        if self.window.get("open"):
            self._profiled += 1
        elif chosen and self.host is not None and self._hosted < self.host_steps and "wall_s" in self.window:
            self._hosted += 1
            self._host_on = True
            self.host.enable()  # this thread's Python calls until the pass returns
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.passes.append({"t0": time.perf_counter(), "ev0": ev, "decode_only": decode_only,
                            "requests": requests, "tokens": tokens})

    def _post(self, module, args, kwargs, output):
        if self._host_on:
            self.host.disable()
            self._host_on = False
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.passes[-1].update(t1=time.perf_counter(), ev1=ev)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if self.window.get("open"):  # the run ended inside the window
            torch.cuda.synchronize()
            self.window["wall_s"] = time.perf_counter() - self.window["t0"]
            torch.cuda._sleep(1)
            self.window.update(open=False, passes=self._profiled)

    def summary(self) -> dict:
        torch.cuda.synchronize()
        out: dict = {}
        for kind, sel in (("decode_only", True), ("with_prefill", False)):
            ps = [p for i, p in enumerate(self.passes) if p["decode_only"] == sel and "t1" in p]
            idx = [i for i, p in enumerate(self.passes) if p["decode_only"] == sel and i + 1 < len(self.passes)]
            out[kind] = {
                "passes": len(ps),
                "requests_median": _median([p["requests"] for p in ps]),
                "tokens_median": _median([p["tokens"] for p in ps]),
                "step_ms_median": _median([(self.passes[i + 1]["t0"] - self.passes[i]["t0"]) * 1e3 for i in idx]),
                "dispatch_ms_median": _median([(p["t1"] - p["t0"]) * 1e3 for p in ps]),
                "device_ms_median": _median([p["ev0"].elapsed_time(p["ev1"]) for p in ps]),
                "step_ms_total": sum((self.passes[i + 1]["t0"] - self.passes[i]["t0"]) * 1e3 for i in idx),
            }
        return out

    def host_profile(self, top: int = 40) -> dict:
        """The cProfile'd passes: the functions with the most own time and the most cumulative time, per pass."""
        if self.host is None or not self._hosted:
            return {}
        st = pstats.Stats(self.host)
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
            rows.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls_per_pass": nc / self._hosted,
                         "own_ms_per_pass": tt * 1e3 / self._hosted, "cum_ms_per_pass": ct * 1e3 / self._hosted})
        return {"passes": self._hosted,
                "by_own_time": sorted(rows, key=lambda r: -r["own_ms_per_pass"])[:top],
                "by_cumulative_time": sorted(rows, key=lambda r: -r["cum_ms_per_pass"])[:top]}

    def kernels(self, prof: profile | None, top: int = 15) -> dict:
        """Kernel time of the window's passes: the kernels between the two marker kernels."""
        if prof is None or "wall_s" not in self.window:
            return {}
        events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                        key=lambda e: e.time_range.start)
        marks = [i for i, e in enumerate(events) if "spin" in e.name.lower() or "sleep" in e.name.lower()]
        if len(marks) < 2:
            return {"error": f"marker kernels not found ({len(marks)})"}
        per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for evt in events[marks[0] + 1: marks[-1]]:
            us = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
            per_kernel[evt.name][0] += us
            per_kernel[evt.name][1] += 1
        total_us = sum(v[0] for v in per_kernel.values())
        by_cat: dict[str, float] = collections.defaultdict(float)
        for name, (us, _) in per_kernel.items():
            by_cat[category(name)] += us
        n = max(1, self.window.get("passes", 1))
        wall_ms = self.window.get("wall_s", float("nan")) * 1e3
        return {
            "passes": self.window.get("passes"),
            "wall_ms_per_pass": wall_ms / n,
            "kernel_ms_per_pass": total_us / 1e3 / n,
            "device_busy_fraction": total_us / 1e3 / wall_ms if wall_ms == wall_ms and wall_ms > 0 else None,
            "kernel_ms_per_pass_by_category": {k: v / 1e3 / n for k, v in sorted(by_cat.items(), key=lambda x: -x[1])},
            "top_kernels": [{"name": k[:120], "ms_per_pass": v[0] / 1e3 / n, "launches_per_pass": v[1] / n}
                            for k, v in sorted(per_kernel.items(), key=lambda x: -x[1][0])[:top]],
            "launches_per_pass": sum(v[1] for v in per_kernel.values()) / n,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--min-prompt", type=int, default=16384)
    ap.add_argument("--max-prompt", type=int, default=16384)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--cache-gib", type=float, default=40.0)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--methods", default="dense,default",
                    help="comma-separated: dense, or a method spec; '<spec>+eager' runs it with serving.GRAPHS off")
    ap.add_argument("--budget", default="1/8")
    ap.add_argument("--profile-steps", type=int, default=12)
    ap.add_argument("--host-steps", type=int, default=0, help="cProfile this many passes of the kind after the window")
    ap.add_argument("--kind", choices=("decode", "prefill"), default="decode",
                    help="profile decode-only passes or passes with prefill tokens")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("serve_profile.py times CUDA passes: run it on a GPU")

    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import sparq
    from sparq import serving
    from sparq.fast import kv_bytes_per_token
    from sparq.methods import build_method
    from sparq.tools.bench_generate import _free, build_model, write_json
    from sparq.tools.bench_serve import _prompts, sketch_bytes_per_token

    serving.check_version()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    lm = build_model(a.model, a.max_prompt + a.new_tokens + 1, dtype=dtype, device="cuda")
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = kv_bytes_per_token(cfg, dtype_bytes=2)
    prompts = _prompts(a.requests, a.min_prompt, a.max_prompt, cfg.vocab_size, 0)
    gen = GenerationConfig(max_new_tokens=a.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    rows = []
    for label in a.methods.split(","):
        # "<spec>+eager": that method with serving.GRAPHS off (its decode-only passes launch every kernel)
        spec, eager = (label[: -len("+eager")], True) if label.endswith("+eager") else (label, False)
        graphs_before = serving.GRAPHS
        serving.GRAPHS = False if eager else graphs_before
        method = None if spec == "dense" else build_method(spec, a.budget, head_dim)
        extra = sketch_bytes_per_token(cfg, method, dtype)
        blocks = int(a.cache_gib * 2**30) // ((per_token + extra) * a.block_size)
        ctx = sparq.enabled(lm, method, fast_loop=False) if method is not None else None
        previous = lm.config._attn_implementation
        if ctx is not None:
            ctx.__enter__()
            serving.use_paged(lm)
        else:
            lm.set_attn_implementation("paged|sdpa")
        try:
            def run(inputs, n_new, timer_steps=None):
                cb = ContinuousBatchingConfig(block_size=a.block_size, num_blocks=blocks,
                                              max_batch_tokens=a.max_batch_tokens, use_cuda_graph=False)
                timer = StepTimer(lm.model, timer_steps, a.host_steps, a.kind) if timer_steps is not None else None
                prof = profile(activities=[ProfilerActivity.CUDA]) if timer_steps else None
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                try:
                    if prof is not None:
                        prof.start()
                    out = lm.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb,
                                            max_new_tokens=n_new)
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - t0
                finally:
                    if timer is not None:
                        timer.close()
                    if prof is not None:
                        prof.stop()
                return out, wall, timer, prof

            run([p[:64] for p in prompts[:2]], 2)  # warm-up
            calls = dict(serving.DECODE_CALLS)
            out, wall, timer, prof = run(prompts, a.new_tokens, a.profile_steps)
            calls = {k: serving.DECODE_CALLS[k] - calls[k] for k in calls}
        finally:
            serving.GRAPHS = graphs_before
            if ctx is not None:
                ctx.__exit__(None, None, None)
            else:
                lm.set_attn_implementation(previous)
        generated = sum(len(r.generated_tokens) for r in out.values())
        row = {"variant": label, "wall_s": wall, "generated_tokens": generated,
               "throughput_tokens_per_s": generated / wall, "num_blocks": blocks, "decode_calls": calls,
               "passes": timer.summary(), "profile": timer.kernels(prof),
               "host_profile": timer.host_profile()}
        rows.append(row)
        s, p = row["passes"], row["profile"]
        print(f"\n== {label}: {row['throughput_tokens_per_s']:.1f} tok/s, wall {wall:.1f} s")
        for kind in ("decode_only", "with_prefill"):
            k = s[kind]
            print(f"  {kind:13s} passes {k['passes']:4d}  requests {k['requests_median']}  step {k['step_ms_median']:8.2f} ms"
                  f"  dispatch {k['dispatch_ms_median']:8.2f} ms  device {k['device_ms_median']:8.2f} ms"
                  f"  total {k['step_ms_total'] / 1e3:7.2f} s")
        if p and "error" in p:
            print(f"  profile: {p['error']}")
        elif p:
            print(f"  profiled {p['passes']} {a.kind} passes: wall {p['wall_ms_per_pass']:.2f} ms/pass, kernels "
                  f"{p['kernel_ms_per_pass']:.2f} ms/pass (busy {p['device_busy_fraction']:.0%}), "
                  f"{p['launches_per_pass']:.0f} launches/pass")
            for c, ms in p["kernel_ms_per_pass_by_category"].items():
                print(f"    {c:32s} {ms:8.2f} ms")
            for t in p["top_kernels"][:10]:
                print(f"    {t['ms_per_pass']:8.2f} ms  x{t['launches_per_pass']:6.1f}  {t['name'][:90]}")
        h = row["host_profile"]
        if h:
            print(f"  host profile of {h['passes']} {a.kind} passes (cProfile; ms per pass):")
            for r in h["by_cumulative_time"][:22]:
                print(f"    cum {r['cum_ms_per_pass']:8.2f}  own {r['own_ms_per_pass']:7.2f}  calls {r['calls_per_pass']:7.1f}  {r['function'][:80]}")
            print("    -- by own time")
            for r in h["by_own_time"][:18]:
                print(f"    own {r['own_ms_per_pass']:7.2f}  calls {r['calls_per_pass']:7.1f}  {r['function'][:80]}")
        del out, timer, prof
        _free(dev)
    result = {"device": torch.cuda.get_device_name(dev),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "sparq": sparq.__version__},
              "settings": vars(a), "kv_bytes_per_token": per_token,
              "timing": "per forward pass: host start-to-start (step), host inside forward (dispatch), CUDA events "
                        "around forward (device); profile: torch.profiler kernel time over decode-only passes",
              "rows": rows}
    write_json(result, a.out_dir, "serve-profile")
    print(result["path"])


if __name__ == "__main__":
    main()
