"""`sparq eval`: compare decode methods on one model, offline, with one command.

The lead registers `eval_command` in the typer CLI; meanwhile ``python -m sparq.eval`` runs it.
With no arguments it runs the "quick" preset on the bundled SmolLM2-135M (about 10 minutes on
2 CPU cores); ``--preset full`` is the committed evaluation.
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
    budgets: Optional[str] = typer.Option(None, help="Comma list of target fractions of dense data, e.g. 1/2,1/4,1/8,1/16."),
    preset: str = typer.Option("quick", help="quick (about 10 min on 2 CPU cores) or full."),
    out: Path = typer.Option(Path("results/eval"), help="Output folder; results go to OUT/<model>/."),
    lengths: Optional[str] = typer.Option(None, help="Needle context lengths in tokens, e.g. 1000,2000,3000."),
    depths: Optional[str] = typer.Option(None, help="Needle depths in [0, 1], e.g. 0.1,0.5,0.9."),
    items: Optional[int] = typer.Option(None, help="Items per needle cell (other tasks scale from it)."),
    qa_file: Optional[Path] = typer.Option(None, help="SQuAD-like JSONL for the qa task (context, question, answers); "
                                                      "a seeded sample is generated when unset."),
    text_file: Optional[Path] = typer.Option(None, help="Plain text for repetition/perplexity contexts "
                                                        "(default: prose of Python's bundled language reference)."),
    batch_size: int = typer.Option(6, help="Prompts per prefill/decode batch (left padded)."),
    seed: int = typer.Option(0, help="Seed for generated tasks."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    report_only: bool = typer.Option(False, help="Only rebuild tables and plots from the records."),
) -> None:
    """Score methods x budgets on tasks; resumable; writes records.jsonl, results.{json,csv,md} and PNGs."""
    import torch

    from ..methods import build_method, parse_budget
    from . import report as rep
    from .runner import evaluate, head_dim_of, load_records
    from .tasks import TASKS, TaskSizes, load_text, make_qa_sample

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p_tasks, p_methods, p_budgets, p_sizes = PRESETS[preset]
    task_list = _list(tasks or p_tasks)
    method_list = _list(methods or p_methods)
    budget_list = _list(budgets or p_budgets)
    for t in task_list:
        if t not in TASKS:
            raise typer.BadParameter(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    for b in budget_list:
        parse_budget(b)
    for m in method_list:
        build_method(m, budget_list[0], 64)  # validates names and options early
    sizes = replace(TaskSizes(), **p_sizes)
    if lengths:
        sizes = replace(sizes, lengths=_ints(lengths))
    if depths:
        sizes = replace(sizes, depths=_floats(depths))
    if items:
        sizes = replace(sizes, items=items)

    out_dir = Path(out) / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    meta = {"model": model, "preset": preset, "tasks": task_list, "methods": method_list, "budgets": budget_list,
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.__dict__.items()},
            "seed": seed, "text": str(text_file) if text_file else "pydoc_data.topics (Python language reference prose)"}
    if report_only:
        rows = rep.report(load_records(out_dir / "records.jsonl"), out_dir, meta)
        typer.echo(rep.markdown(rows))
        return

    torch.set_num_threads(threads)
    if "qa" in task_list and qa_file is None:
        qa_file = out_dir / "qa_sample.jsonl"
        if not qa_file.exists():
            make_qa_sample(qa_file, load_text(text_file), seed=seed)
            typer.echo(f"qa: no --qa-file given; generated a seeded sample at {qa_file}", err=True)
    from ..models import load

    t0 = time.time()
    lm, tok = load(model, device=device)
    typer.echo(f"{model}: head_dim {head_dim_of(lm)}; tasks {task_list}; methods {method_list}; budgets {budget_list}",
               err=True)
    records = evaluate(lm, tok, model, task_list, method_list, budget_list, out_dir, sizes, seed=seed,
                       batch_size=batch_size, qa_file=qa_file, text_file=text_file,
                       log=lambda s: typer.echo(s, err=True))
    meta["wall_s"] = round(time.time() - t0, 1)
    rows = rep.report(records, out_dir, meta)
    typer.echo(rep.markdown(rows))
    typer.echo(f"results: {out_dir}/results.{{json,csv,md}} and PNGs ({meta['wall_s']} s)", err=True)


def main() -> None:  # python -m sparq.eval
    app = typer.Typer(add_completion=False)
    app.command()(eval_command)
    app(sys.argv[1:])
