"""The `sparq` command line. Thin: parse options, call the library, print.

Nothing heavy is imported at module level (torch and transformers load inside the commands), so
``sparq --help`` answers at once. Errors a user can fix print one line, ``Error: ...``, and exit
with status 2; they never show a traceback.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

app = typer.Typer(help="SparQ Attention: bandwidth-efficient decode attention for Hugging Face models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
bench_app = typer.Typer(help="Benchmarks against the bandwidth floor.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[str, typer.Option(help="Bundled name (smollm2, gemma3-270m), Hugging Face id or local path.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")]


def default_threads() -> int:
    """torch CPU threads unless --threads says otherwise: the cores not already busy (this process's
    cores less the 1-minute load average, rounded), at least 1, at most 4.

    More threads than free cores is the trap: on a 2-core machine with one core busy, plain HF
    generation of 16 tokens took 24.5 s on 2 threads against 2.6 s on 1; on the same machine idle,
    2 threads took 0.8 s against 1.2 s on 1. So an idle machine gets its cores, a busy one fewer.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(4, round(cores - busy)))


ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads [default: the cores not busy "
                                                                "(cores less the load average), 1 to 4].")]


class _console:
    """rich's Console, imported on first use (keeps --help fast)."""

    _c = None

    def __getattr__(self, name: str):
        if _console._c is None:
            from rich.console import Console

            _console._c = Console()
        return getattr(_console._c, name)


console = _console()


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2 (as for a usage error), no traceback."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n if n is not None else default_threads())


def _check_model(model: str) -> None:
    from ..models import ModelUnavailable, check

    try:
        check(model)
    except ModelUnavailable as e:
        fail(str(e))


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        fail(f"--device {device!r} is not a torch device (use cpu or cuda, or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            fail(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {device}: MPS is not available here; use --device cpu")


def _compression(text: str) -> float:
    """--compression 8 or 1/8 (or 0.125): the compression ratio N (reads 1/N of dense data)."""
    from ..methods.registry import parse_budget

    try:
        return 1.0 / parse_budget(text)
    except ValueError:
        fail(f"--compression must be a ratio such as 8 or a fraction such as 1/8, got {text!r}")


def _load(model: str, device: str):
    """Load a model after the checks that can fail fast; library errors become one-line errors."""
    from .. import models

    try:
        return models.load(model, device=device)
    except (OSError, ValueError) as e:  # ModelUnavailable is a ValueError
        fail(f"cannot load model {model!r}: {' '.join(str(e).split())}")


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this file.")] = None,
    model: ModelOpt = "smollm2",
    method: Annotated[str, typer.Option(help="default (sparq-sketch:local=0:realloc=0, the recommended method), "
                                               "dense, sparq (the paper's), or any method spec of `sparq eval`, "
                                               "e.g. sparq-sketch:bits=1, h2o, quest.")] = "default",
    compression: Annotated[str, typer.Option(help="Read 1/N of dense attention data: 8 or 1/8 (the same budget "
                                                  "as `sparq eval --budgets 1/8`).")] = "8",
    r: Annotated[Optional[int], typer.Option(help="sparq only: key dimensions read in step 1 (k takes what is "
                                                  "left of the budget).")] = None,
    k: Annotated[Optional[int], typer.Option(help="sparq only: positions kept in step 2 (fixed).")] = None,
    local_window: Annotated[Optional[int], typer.Option(help="sparq only: recent positions always kept "
                                                             "(part of k).")] = None,
    reallocate: Annotated[Optional[bool], typer.Option("--reallocate/--no-reallocate", help="sparq only: step 3, "
                                                       "mean-value reallocation [default: off, as "
                                                       "SparQConfig.from_compression].")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    fast: Annotated[bool, typer.Option(help="Greedy decoding in the static-cache fast loop (Llama, Mistral, Qwen2/3, "
                                            "Phi-3, Gemma 3; Gemma 2 with --method dense only; CUDA graphs and the SparQ "
                                            "kernels on a GPU); any method, CUDA-graph captured for dense and sparq.")] = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Generate from a prompt with dense or SparQ decode attention; streams the text."""
    if (prompt is None) == (prompt_file is None):
        fail("give exactly one of PROMPT or --prompt-file")
    if prompt_file is not None and not prompt_file.is_file():
        fail(f"--prompt-file {str(prompt_file)!r} does not exist" if not prompt_file.exists()
             else f"--prompt-file {str(prompt_file)!r} is not a file")
    try:
        text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--prompt-file {str(prompt_file)!r} cannot be read as UTF-8 text ({e})")
    _check_model(model)  # before anything loads torch: a typo is answered at once
    c = _compression(compression)
    from ..methods.registry import parse_spec

    try:
        base, _ = parse_spec(method)
    except ValueError as e:
        fail(f"--method: {e}")
    given = [f"--{n}" for n, v in (("r", r), ("k", k), ("local-window", local_window)) if v is not None]
    given += [] if reallocate is None else ["--reallocate" if reallocate else "--no-reallocate"]
    if given and base != "sparq":
        fail(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --method sparq only (got --method "
             f"{method}); put other methods' options in the spec, e.g. --method sparq-sketch:local=0")
    from . import generation

    try:  # every option checked before the model loads (head_dim only scales r: any value checks them)
        generation.make_method(method, 64, compression=c, r=r, k=k, local_window=local_window, reallocate=reallocate)
    except ValueError as e:
        fail(str(e))
    _check_device(device)
    _threads(threads)
    from transformers import TextStreamer

    lm, tok = _load(model, device)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    try:
        m = generation.make_method(method, generation.head_dim_of(lm), compression=c, r=r, k=k,
                                   local_window=local_window, reallocate=reallocate)
    except ValueError as e:
        fail(str(e))
    if fast:
        from ..fast import fast_generate

        enc = tok([text], return_tensors="pt")
        try:
            out, t = fast_generate(lm, enc.input_ids, enc.attention_mask, m, max_new_tokens,
                                   eos_token_id=tok.eos_token_id)
        except ValueError as e:
            fail(str(e))
        console.print(tok.decode(out[0], skip_special_tokens=True), markup=False, highlight=False)
        console.print(f"\n[dim]{m.label} (fast loop): prompt {enc.input_ids.shape[1]} tokens, prefill {t.prefill_s:.2f} s, "
                      f"decode {1e3 / t.ms_per_token:.1f} tokens/s[/dim]", soft_wrap=True)
        return
    try:
        res = generation.generate(lm, tok, [text], m, max_new_tokens=max_new_tokens,
                                  streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    except ValueError as e:  # e.g. sparq.enable refusing an architecture
        fail(str(e))
    console.print(f"\n[dim]{m.label}: prompt {res.prompt_tokens[0]} tokens, prefill {res.prefill_s:.2f} s, "
                  f"decode {res.decode_tokens_per_s:.1f} tokens/s, attention data read "
                  f"{res.fraction_read:.3f} of dense[/dim]", soft_wrap=True)


@app.command()
def demo(
    model: ModelOpt = "smollm2",
    context: Annotated[int, typer.Option(min=16, help="Prompt length in tokens.")] = 2000,
    compression: Annotated[str, typer.Option(help="The default method reads 1/N of dense attention data: 8 or 1/8.")] = "8",
    keys: Annotated[int, typer.Option(min=1, help="Number of passkey prompts (different keys and depths).")] = 3,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Passkey retrieval over a long prompt: dense and the default method's answers side by side."""
    _check_model(model)
    c = _compression(compression)
    _check_device(device)
    _threads(threads)
    from rich.table import Table

    from . import generation

    lm, tok = _load(model, device)
    prompts, answers = [], []
    for i in range(keys):
        p, key = generation.passkey_prompt(tok, context, depth=(i + 0.5) / keys, seed=i)
        prompts.append(p)
        answers.append(key)
    d = generation.head_dim_of(lm)
    table = Table(title=f"Passkey retrieval, {model}, ~{context}-token prompts")
    table.add_column("key")
    runs = {}
    for name in ("dense", "default"):
        method = generation.make_method(name, d, compression=c)
        console.print(f"[dim]running {method.label} ...[/dim]")
        try:
            runs[name] = (method, generation.generate(lm, tok, prompts, method, max_new_tokens=8))
        except ValueError as e:
            fail(str(e))
        table.add_column(f"{name} answer")
    for i, key in enumerate(answers):
        cells = []
        for name in runs:
            text = runs[name][1].texts[i].strip()
            ok = key in text
            cells.append(f"[{'green' if ok else 'red'}]{text!r}[/]")
        table.add_row(key, *cells)
    console.print(table)
    for name, (method, res) in runs.items():
        correct = sum(k in t for k, t in zip(answers, res.texts))
        console.print(f"{name:6s} {method.label:40s} correct {correct}/{len(answers)}  "
                      f"attention data read {res.fraction_read:.3f} of dense  "
                      f"prompt {min(res.prompt_tokens)}-{max(res.prompt_tokens)} tokens  "
                      f"decode {res.decode_tokens_per_s:.1f} tokens/s (batch {len(prompts)})", soft_wrap=True)
    if next(lm.parameters()).device.type != "cuda":  # say why the speed is not the point here
        console.print("[dim]On the CPU the sparse methods run their PyTorch reference path, which is slower than "
                      "dense attention; this demo shows the answers and the data read. The speed-up needs the "
                      "GPU kernels: `sparq bench generate` on a GPU (README, 'Speed on an H200').[/dim]",
                      soft_wrap=True)


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{name} must be a comma-separated list of integers, got {text!r}")
    if not values or min(values) < 1:
        fail(f"{name} must hold positive integers, got {text!r}")
    return values


def results_dir(out_dir: Path | None) -> Path:
    """Where a benchmark's JSON goes: --out-dir, else $OUT (the GPU machines' folder that comes back, as
    the scripts in benchmarks/ use it), else benchmarks/results."""
    return out_dir if out_dir is not None else Path(os.environ.get("OUT") or "benchmarks/results")


@bench_app.command("kernels")
def bench_kernels(
    r_div: Annotated[int, typer.Option(min=1, help="r = head_dim / R_DIV.")] = 8,
    k_div: Annotated[int, typer.Option(min=1, help="k = S / K_DIV.")] = 16,
    local_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Local window as a fraction of k.")] = 0.25,
    reallocate: Annotated[bool, typer.Option(help="Step 3 on or off.")] = True,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON goes (default: $OUT if set, else "
                                                         "benchmarks/results).")] = None,
) -> None:
    """SparQ decode kernels vs the best dense SDPA backend, per shape, against the bandwidth floor (CUDA)."""
    import torch

    if not torch.cuda.is_available():
        fail("bench kernels needs a CUDA device")
    from .bench_kernels import bench_kernels as run

    result = run(r_div=r_div, k_div=k_div, local_fraction=local_fraction, reallocate=reallocate,
                 out_dir=results_dir(out_dir))
    console.print(f"wrote {result.get('path')}")


@bench_app.command("generate")
def bench_generate(
    model: Annotated[str, typer.Option(help="Random-weight shape (llama3-8b, llama3-70b, smollm2-135m) or an HF id / path.")]
    = "llama3-8b",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    context: Annotated[str, typer.Option(help="Comma-separated context lengths.")] = "4096,32768",
    new_tokens: Annotated[int, typer.Option(min=2, help="Decode steps timed per method.")] = 64,
    compressions: Annotated[str, typer.Option(help="SparQ budgets 1/N, comma-separated N.")] = "4,8,16",
    ragged: Annotated[bool, typer.Option(help="Spread prompt lengths from context/2 to context.")] = False,
    auto: Annotated[int, typer.Option(min=0, help="Also run the autotune policy (dense or the default method "
                                                  "at 1/N, whichever is measured faster); 0 = off.")] = 8,
    tp: Annotated[bool, typer.Option("--tp", help="Tensor parallelism over the GPUs of a torchrun launch "
                                               "(torchrun --nproc-per-node N -m sparq.tools.cli bench generate --tp).")] = False,
    sketch: Annotated[str, typer.Option(help="Also run sparq-sketch at these budgets 1/N with the "
                                             "default method's settings (no local window, no reallocation; "
                                             "comma-separated N; '' = none).")] = "",
    sketch_bits: Annotated[int, typer.Option(min=1, max=2, help="Bits of the sketch (1 or 2).")] = 2,
    engine: Annotated[str, typer.Option(help="fast: dense and SparQ in the fast loop (floors, autotune, TP). hf: "
                                             "through model.generate -- dense with transformers' cache settings, "
                                             "SparQ under sparq.enabled -- next to the fast loop, same run.")] = "fast",
    dense_settings: Annotated[str, typer.Option(help="--engine hf: dense generate settings, comma-separated "
                                                     "(dynamic, static+compile).")] = "dynamic,static+compile",
    hf_loop: Annotated[bool, typer.Option(help="--engine hf: also SparQ in transformers' own loop "
                                               "(sparq.enabled(..., fast_loop=False); slow).")] = False,
    device: Annotated[str, typer.Option(help="--engine hf: the device (cpu runs a smoke test, e.g. --model "
                                             "tiny).")] = "cuda",
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON goes (default: $OUT if set, else "
                                                         "benchmarks/results).")] = None,
) -> None:
    """Decode tokens/s of dense vs SparQ: in one static-cache CUDA-graph loop with floors and memory
    (--engine fast), or through model.generate next to that loop (--engine hf). CUDA (hf: also CPU)."""
    import torch

    batches, contexts = _int_list(batch, "--batch"), _int_list(context, "--context")
    comps = _int_list(compressions, "--compressions")
    if engine not in ("fast", "hf"):
        fail(f"--engine must be fast or hf, got {engine!r}")
    if engine == "hf":
        from .bench_generate import HF_DENSE_SETTINGS, bench_hf_generate, format_hf_table

        settings = tuple(x.strip() for x in dense_settings.split(",") if x.strip())
        if set(settings) - set(HF_DENSE_SETTINGS):
            fail(f"--dense-settings must be among {', '.join(HF_DENSE_SETTINGS)}, got {dense_settings!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            fail("bench generate --engine hf --device cuda needs a CUDA device (--device cpu for a smoke test)")
        result = bench_hf_generate(model, batches, contexts, new_tokens, comps, dense_settings=settings,
                                   hf_loop=hf_loop, ragged=ragged, device=device,
                                   dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                                   out_dir=results_dir(out_dir))
        console.print(format_hf_table(result), soft_wrap=True)
        console.print(f"wrote {result.get('path')}")
        return
    if not torch.cuda.is_available():
        fail("bench generate needs a CUDA device")
    from .bench_generate import bench_generate as run

    from .bench_generate import format_table

    sketches = _int_list(sketch, "--sketch") if sketch.strip() else ()
    result = run(model, batches, contexts, new_tokens, comps, auto=auto or None, ragged=ragged, tensor_parallel=tp,
                 out_dir=results_dir(out_dir), sketch=sketches, sketch_bits=sketch_bits)
    if result.get("path") or not tp:  # rank 0 reports
        console.print(format_table(result), soft_wrap=True)
        console.print(f"wrote {result.get('path')}")


@bench_app.command("serve")
def bench_serve(
    model: Annotated[str, typer.Option(help="Random-weight shape (llama3-8b, tiny, ...) or an HF id / path.")]
    = "llama3-8b",
    requests: Annotated[int, typer.Option(min=1, help="Requests submitted at once.")] = 64,
    min_prompt: Annotated[int, typer.Option(min=1, help="Shortest prompt (tokens).")] = 8192,
    max_prompt: Annotated[int, typer.Option(min=1, help="Longest prompt (tokens); lengths spread evenly.")] = 32768,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated per request (greedy, no EOS).")] = 256,
    methods: Annotated[str, typer.Option(help="Variants, comma-separated: dense (transformers' paged|sdpa), "
                                              "dense-per-request (dense attention through paged|sparq: each "
                                              "prefill request over its own keys) and method specs run as paged|sparq "
                                              "(default, sparq, ...).")]
    = "dense,default,sparq",
    budget: Annotated[str, typer.Option(help="SparQ budget: a fraction of dense data (1/8) or a ratio (8).")] = "1/8",
    cache_gib: Annotated[float, typer.Option(min=0.0, help="Paged KV cache size, the same for every variant.")] = 40.0,
    block_size: Annotated[int, typer.Option(min=4, help="Tokens per cache block.")] = 256,
    max_batch_tokens: Annotated[int, typer.Option(min=1, help="Tokens per continuous-batching step.")] = 8192,
    device: Annotated[str, typer.Option(help="cuda, or cpu for a smoke test (--model tiny).")] = "cuda",
    kernels: Annotated[Optional[bool], typer.Option(
        "--kernels/--no-kernels", help="The default method's decode requests on the Triton kernels (sparq.serving."
                                       "KERNELS); unset: its default.")] = None,
    read_pages: Annotated[Optional[bool], typer.Option(
        "--read-pages/--no-read-pages", help="Decode-only batches on the kernels route read K/V through the "
                                             "pages, skipping transformers' gather (sparq.serving.READ_PAGES); "
                                             "unset: its default.")] = None,
    graphs: Annotated[Optional[bool], typer.Option(
        "--graphs/--no-graphs", help="Those batches replay one CUDA graph per layer for the step sketch and the "
                                     "kernels (sparq.serving.GRAPHS); unset: its default (on).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where the JSON goes (default: $OUT if set, else "
                                                         "benchmarks/results).")] = None,
) -> None:
    """Continuous batching (transformers' generate_batch, paged KV cache): dense vs SparQ, same requests and
    cache. Throughput, time per output token (median, p95), requests in flight, peak memory."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("bench serve --device cuda needs a CUDA device (--device cpu --model tiny for a smoke test)")
    names = tuple(x.strip() for x in methods.split(",") if x.strip())
    from .. import serving
    from .bench_serve import bench_serve as run
    from .bench_serve import format_serve_table

    try:
        serving.check_version()
        result = run(model, requests, min_prompt, max_prompt, new_tokens, names, budget, cache_gib=cache_gib,
                     block_size=block_size, max_batch_tokens=max_batch_tokens, device=device, kernels=kernels, read_pages=read_pages,
                     graphs=graphs, out_dir=results_dir(out_dir))
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    console.print(format_serve_table(result), soft_wrap=True)
    console.print(f"wrote {result.get('path')}")


@app.command()
def info() -> None:
    """Versions, device and which kernels are available."""
    import torch
    import transformers
    from rich.table import Table

    import sparq

    table = Table(show_header=False)
    table.add_row("sparq", sparq.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    try:
        import triton

        table.add_row("triton", triton.__version__)
    except ImportError:
        table.add_row("triton", "not installed")
    if torch.cuda.is_available():
        table.add_row("device", f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        table.add_row("device", "cpu (no CUDA device)")
    table.add_row("kernels", _kernel_status())
    console.print(table)


def _kernel_status() -> str:
    try:
        from .. import kernels
    except Exception as e:  # noqa: BLE001 - report, never crash `info`
        return f"unavailable ({type(e).__name__}: {e})"
    import torch

    if kernels.available("cuda"):
        return f"Triton kernels on {torch.cuda.get_device_name()}"
    if not kernels.triton_importable():
        return "unavailable: triton is not installed (PyTorch reference in use)"
    if kernels.interpreting():
        return "Triton interpreter on the CPU (TRITON_INTERPRET=1; for tests, slow)"
    return "unavailable: no CUDA device (PyTorch reference in use)"


def _register_eval() -> None:
    from .eval.command import eval_command

    app.command("eval", help="Accuracy vs data read: dense, SparQ and rival methods on offline tasks.")(eval_command)


_register_eval()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
