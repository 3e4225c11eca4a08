"""The `sparq` command line. Thin: parse options, call the library, print."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="SparQ Attention: bandwidth-efficient decode attention for Hugging Face models.",
                  no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks against the bandwidth floor.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()

ModelOpt = Annotated[str, typer.Option(help="Bundled name (smollm2, gemma3-270m), Hugging Face id or local path.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")]


def _threads() -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this file.")] = None,
    model: ModelOpt = "smollm2",
    method: Annotated[str, typer.Option(help="dense, sparq (the paper's), or any method spec of `sparq eval`, "
                                               "e.g. sparq-sketch:local=0, h2o, quest.")] = "sparq",
    compression: Annotated[float, typer.Option(help="Target fraction 1/N of dense attention data.")] = 8.0,
    r: Annotated[Optional[int], typer.Option(help="Key dimensions read in step 1 (overrides --compression).")] = None,
    k: Annotated[Optional[int], typer.Option(help="Positions kept in step 2 (overrides --compression).")] = None,
    local_window: Annotated[Optional[int], typer.Option(help="Recent positions always kept (part of k).")] = None,
    reallocate: Annotated[bool, typer.Option(help="Step 3: mean-value reallocation.")] = True,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    fast: Annotated[bool, typer.Option(help="Greedy decoding in the static-cache fast loop (Llama-family and Gemma 3 "
                                            "models; CUDA graphs and the SparQ kernels on a GPU); any method, CUDA-graph "
                                            "captured for dense and sparq.")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Generate from a prompt with dense or SparQ decode attention; streams the text."""
    from transformers import TextStreamer

    from . import generation, models

    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give exactly one of PROMPT or --prompt-file")
    text = prompt if prompt is not None else prompt_file.read_text()
    _threads()
    lm, tok = models.load(model, device=device)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    try:
        m = generation.make_method(method, generation.head_dim_of(lm), compression=compression, r=r, k=k,
                                   local_window=local_window, reallocate=reallocate)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if fast:
        from .fast import fast_generate

        enc = tok([text], return_tensors="pt")
        try:
            out, t = fast_generate(lm, enc.input_ids, enc.attention_mask, m, max_new_tokens,
                                   eos_token_id=tok.eos_token_id)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        console.print(tok.decode(out[0], skip_special_tokens=True), markup=False, highlight=False)
        console.print(f"\n[dim]{m.label} (fast loop): prompt {enc.input_ids.shape[1]} tokens, prefill {t.prefill_s:.2f} s, "
                      f"decode {1e3 / t.ms_per_token:.1f} tokens/s[/dim]", soft_wrap=True)
        return
    res = generation.generate(lm, tok, [text], m, max_new_tokens=max_new_tokens,
                              streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    console.print(f"\n[dim]{m.label}: prompt {res.prompt_tokens[0]} tokens, prefill {res.prefill_s:.2f} s, "
                  f"decode {res.decode_tokens_per_s:.1f} tokens/s, attention data read "
                  f"{res.fraction_read:.3f} of dense[/dim]", soft_wrap=True)


@app.command()
def demo(
    model: ModelOpt = "smollm2",
    context: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 2000,
    compression: Annotated[float, typer.Option(help="SparQ reads 1/N of dense attention data.")] = 8.0,
    keys: Annotated[int, typer.Option(min=1, help="Number of passkey prompts (different keys and depths).")] = 3,
    device: DeviceOpt = "cpu",
) -> None:
    """Passkey retrieval over a long prompt: dense and SparQ answers side by side."""
    from . import generation, models

    _threads()
    lm, tok = models.load(model, device=device)
    prompts, answers = [], []
    for i in range(keys):
        p, key = generation.passkey_prompt(tok, context, depth=(i + 0.5) / keys, seed=i)
        prompts.append(p)
        answers.append(key)
    d = generation.head_dim_of(lm)
    table = Table(title=f"Passkey retrieval, {model}, ~{context}-token prompts")
    table.add_column("key")
    runs = {}
    for name in ("dense", "sparq"):
        method = generation.make_method(name, d, compression=compression)
        console.print(f"[dim]running {method.label} ...[/dim]")
        runs[name] = (method, generation.generate(lm, tok, prompts, method, max_new_tokens=8))
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


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{name} must hold positive integers, got {text!r}")
    return values


@bench_app.command("kernels")
def bench_kernels(
    r_div: Annotated[int, typer.Option(min=1, help="r = head_dim / R_DIV.")] = 8,
    k_div: Annotated[int, typer.Option(min=1, help="k = S / K_DIV.")] = 16,
    local_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Local window as a fraction of k.")] = 0.25,
    reallocate: Annotated[bool, typer.Option(help="Step 3 on or off.")] = True,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON goes.")] = Path("benchmarks/results"),
) -> None:
    """SparQ decode kernels vs the best dense SDPA backend, per shape, against the bandwidth floor (CUDA)."""
    import torch

    if not torch.cuda.is_available():
        raise typer.BadParameter("bench kernels needs a CUDA device")
    from .bench import bench_kernels as run

    result = run(r_div=r_div, k_div=k_div, local_fraction=local_fraction, reallocate=reallocate, out_dir=out_dir)
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
    auto: Annotated[int, typer.Option(min=0, help="Also run the autotune policy (dense or SparQ 1/N, whichever "
                                                  "is measured faster); 0 = off.")] = 8,
    tp: Annotated[bool, typer.Option("--tp", help="Tensor parallelism over the GPUs of a torchrun launch "
                                               "(torchrun --nproc-per-node N -m sparq.cli bench generate --tp).")] = False,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON goes.")] = Path("benchmarks/results"),
) -> None:
    """Decode tokens/s of dense vs SparQ in one static-cache CUDA-graph loop, with floors and memory (CUDA)."""
    import torch

    batches, contexts = _int_list(batch, "--batch"), _int_list(context, "--context")
    comps = _int_list(compressions, "--compressions")
    if not torch.cuda.is_available():
        raise typer.BadParameter("bench generate needs a CUDA device")
    from .bench_e2e import bench_generate as run

    from .bench_e2e import format_table

    result = run(model, batches, contexts, new_tokens, comps, auto=auto or None, ragged=ragged, tensor_parallel=tp,
                 out_dir=out_dir)
    if result.get("path") or not tp:  # rank 0 reports
        console.print(format_table(result), soft_wrap=True)
        console.print(f"wrote {result.get('path')}")


@app.command()
def info() -> None:
    """Versions, device and which kernels are available."""
    import torch
    import transformers

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
        from . import kernels
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
