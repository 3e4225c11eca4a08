"""`sparq eval`: compare decode methods on one model, offline, with one command.

Registered as `sparq eval` in the typer CLI; ``python -m sparq.tools.eval`` runs it too.
With no arguments it runs the "quick" preset on the bundled SmolLM2-135M (about 10 minutes on
2 CPU cores) into ``runs/eval/<model>/`` (never the committed ``results/eval/``: pass
``--out results/eval`` to rebuild those); ``--preset full`` is the committed evaluation.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

PRESETS = {
    # name: (tasks, methods, budgets, size overrides)
    "quick": ("passkey,kv,repetition", "dense,sparq,sparq-sketch,streaming,h2o,quest,topk", "1/8",
              dict(lengths=(1000, 2000), depths=(0.1, 0.5, 0.9), items=1, repetition_context=1500,
                   repetition_tokens=32, kv_pairs=100)),
    "full": ("passkey,kv,repetition,perplexity,qa", "dense,sparq,sparq-sketch,streaming,h2o,quest,topk",
             "1/2,1/4,1/8,1/16",
             dict(lengths=(1000, 2000, 3000), depths=(0.1, 0.5, 0.9), items=2, repetition_context=2000,
                  repetition_tokens=32, ppl_context=1500, ppl_tokens=32, kv_pairs=100, qa_items=8)),
}


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def eval_command(
    model: str = typer.Option("smollm2", help="Bundled name (smollm2, gemma3-270m) or any Hugging Face id/path."),
    tasks: Optional[str] = typer.Option(None, help="Comma list of passkey,kv,repetition,perplexity,qa (preset's if unset)."),
    methods: Optional[str] = typer.Option(
        None, help="Comma list of method specs: dense,sparq,sparq-sketch,streaming,h2o,quest,topk; "
                   "options as name:key=value, e.g. sparq-sketch:bits=1:local=0.5 or sparq:r=16."),
    budgets: Optional[str] = typer.Option(None, help="Comma list of target fractions of dense data, e.g. 1/2,1/4,1/8,1/16 "
                                                     "(or compression ratios: 2,4,8,16)."),
    preset: str = typer.Option("quick", help="quick (about 10 min on 2 CPU cores) or full."),
    out: Path = typer.Option(Path("runs/eval"), help="Output folder; results go to OUT/<model>/ (the committed "
                                                     "evaluation is under results/eval)."),
    lengths: Optional[str] = typer.Option(None, help="Needle context lengths in tokens, e.g. 1000,2000,3000."),
    depths: Optional[str] = typer.Option(None, help="Needle depths in [0, 1], e.g. 0.1,0.5,0.9."),
    items: Optional[int] = typer.Option(None, help="Items per needle cell (other tasks scale from it)."),
    qa_file: Optional[Path] = typer.Option(None, help="SQuAD-like JSONL for the qa task (context, question, answers); "
                                                      "a seeded sample is generated when unset."),
    text_file: Optional[Path] = typer.Option(None, help="Plain text for repetition/perplexity contexts "
                                                        "(default: prose of Python's bundled language reference)."),
    batch_size: int = typer.Option(6, help="Prompts per prefill/decode batch (left padded)."),
    seed: int = typer.Option(0, help="Seed for generated tasks."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads [default: the cores not busy, 1 to 4]."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    report_only: bool = typer.Option(False, help="Only rebuild tables and plots from the records."),
) -> None:
    """Score methods x budgets on tasks; resumable; writes records.jsonl, results.{json,csv,md} and PNGs."""
    from ..cli import _check_device, _check_model, _threads, fail
    from ...methods import budget_label, build_method
    from . import report as rep
    from .runner import current, evaluate, head_dim_of, load_records, settings_keys
    from .tasks import TASKS, TaskSizes, load_text, make_qa_sample

    if preset not in PRESETS:
        fail(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p_tasks, p_methods, p_budgets, p_sizes = PRESETS[preset]
    task_list = _list(tasks or p_tasks)
    method_list = _list(methods or p_methods)
    try:
        budget_list = list(dict.fromkeys(budget_label(b) for b in _list(budgets or p_budgets)))
    except ValueError as e:
        fail(f"--budgets: {e}")
    for t in task_list:
        if t not in TASKS:
            fail(f"--tasks: unknown task {t!r}; known: {', '.join(TASKS)}")
    for m in method_list:
        try:
            build_method(m, budget_list[0], 64)  # validates names and options early
        except ValueError as e:
            fail(f"--methods: {e}")
    try:
        sizes = replace(TaskSizes(), **p_sizes)
        if lengths:
            sizes = replace(sizes, lengths=_ints(lengths))
        if depths:
            sizes = replace(sizes, depths=_floats(depths))
    except ValueError as e:
        fail(f"--lengths/--depths must be comma lists of numbers ({e})")
    if items:
        sizes = replace(sizes, items=items)
    for f, name in ((qa_file, "--qa-file"), (text_file, "--text-file")):
        if f is not None and not Path(f).is_file():
            fail(f"{name}: no such file {str(f)!r}")

    if not report_only:
        _check_model(model)
        _check_device(device)

    out_dir = Path(out) / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    if "qa" in task_list and qa_file is None:
        qa_file = out_dir / "qa_sample.jsonl"
        if not qa_file.exists() and not report_only:
            make_qa_sample(qa_file, load_text(text_file), seed=seed)
            typer.echo(f"qa: no --qa-file given; generated a seeded sample at {qa_file}", err=True)
    sample = out_dir / "qa_sample.jsonl"
    qa_for_key = qa_file if qa_file is not None else (sample if sample.exists() else None)
    settings = settings_keys(model, list(TASKS), sizes, seed=seed, batch_size=batch_size, device=device,
                             text_file=text_file, qa_file=qa_for_key if Path(qa_for_key or "").is_file() else None)
    meta = {"model": model, "preset": preset, "tasks": task_list, "methods": method_list, "budgets": budget_list,
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.__dict__.items()},
            "seed": seed, "batch_size": batch_size, "device": device, "settings": settings,
            "text": str(text_file) if text_file else "pydoc_data.topics (Python language reference prose)"}
    if report_only:
        everything = load_records(out_dir / "records.jsonl")
        mine = current(everything, settings)
        if not mine:  # never overwrite a report with an empty one
            fail(f"no records of these settings in {out_dir / 'records.jsonl'} ({len(everything)} records of other "
                 f"settings, or from before settings were recorded); nothing written")
        rows = rep.report(mine, out_dir, meta)
        typer.echo(rep.markdown(rows))
        return

    _threads(threads)
    from ..cli import _load

    t0 = time.time()
    lm, tok = _load(model, device)
    typer.echo(f"{model}: head_dim {head_dim_of(lm)}; tasks {task_list}; methods {method_list}; budgets {budget_list}",
               err=True)
    try:
        records = evaluate(lm, tok, model, task_list, method_list, budget_list, out_dir, sizes, seed=seed,
                           batch_size=batch_size, qa_file=qa_file, text_file=text_file,
                           log=lambda s: typer.echo(s, err=True))
    except ValueError as e:  # e.g. sparq.enable refusing the architecture
        fail(str(e))
    meta["wall_s"] = round(time.time() - t0, 1)
    rows = rep.report(records, out_dir, meta)
    typer.echo(rep.markdown(rows))
    typer.echo(f"results: {out_dir}/results.{{json,csv,md}} and PNGs ({meta['wall_s']} s)", err=True)


def main() -> None:  # python -m sparq.tools.eval
    app = typer.Typer(add_completion=False)
    app.command()(eval_command)
    app(sys.argv[1:])
