"""Turn records into results: summary JSON and CSV, Markdown tables, PNG plots.

Scores are means over items. "% of dense" is score / dense score on the same items for tasks where higher is
better, and dense / score for perplexity (bits per token, lower is better), so 100% always
means "as good as dense". The fraction is the mean, over decode steps and items, of the data
each step read relative to dense attention (layers left dense, e.g. Gemma 3's sliding-window
layers, are not counted).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

from .tasks import HIGHER_IS_BETTER, SCORE_NAME, TASKS


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def budget_value(b: str) -> float:
    return float(Fraction(b))


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["task"], r["method"], r["budget"])].append(r)
    # dense per item, so every method is compared with dense on exactly its own items
    dense = {(m, t): {r["item"]: r["score"] for r in rs} for (m, t, meth, _), rs in groups.items() if meth == "dense"}
    rows = []
    for (model, task, method, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _task_order(kv[0][1]), kv[0][2], -budget_value(kv[0][3]))):
        score = _mean([r["score"] for r in rs])
        per_item = dense.get((model, task), {})
        paired = [per_item[r["item"]] for r in rs if r["item"] in per_item]
        ref = _mean(paired) if paired else None
        if ref is None or ref <= 0 or math.isnan(score) or (not HIGHER_IS_BETTER[task] and score <= 0):
            rel = float("nan")  # no dense score to compare with (or dense scored 0)
        else:
            rel = score / ref if HIGHER_IS_BETTER[task] else ref / score
        rows.append({"model": model, "task": task, "method": method, "budget": budget,
                     "fraction": _mean([r["fraction"] for r in rs]), "score": score, "n": len(rs),
                     "rel_dense": rel, "metric": SCORE_NAME[task], "label": rs[0].get("label", method)})
    return rows


def method_order(m: str) -> tuple:
    """dense first, then each method at its defaults followed by its variants ("name:opt=...")."""
    return (m != "dense", m.split(":")[0], ":" in m, m)


def _style(m: str, variant_index: int) -> tuple[Any, str, str, str]:
    """(colour, marker, line style, marker face) of a method's line: a variant ("name:opt=...") takes
    its method's colour with a dashed or dotted line and hollow markers, so every spec that ran
    has its own line."""
    color, marker, ls = STYLE.get(m.split(":")[0], (None, "o", "-"))
    if ":" not in m:
        return color, marker, ls, "full"
    return color, marker, ("--", ":", "-.")[variant_index % 3], "none"


def _task_order(t: str) -> int:
    return TASKS.index(t) if t in TASKS else len(TASKS)


def write_tables(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1), encoding="utf-8")
    with (out_dir / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "1"}, key=budget_value, reverse=True)
    text = "".join(f"### All methods at {b} of dense data\n\n{budget_table(rows, b)}\n" for b in budgets)
    (out_dir / "results.md").write_text(text + markdown(rows), encoding="utf-8")


def _fmt(task: str, score: float) -> str:
    return f"{score:.2f}" if task in ("perplexity", "repetition") else f"{score:.3f}"


def markdown(rows: list[dict[str, Any]], main_methods: tuple[str, ...] | None = None) -> str:
    """Per task: methods x budgets (score, % of dense); then every spec at each budget by task."""
    out = []
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "1"}, key=budget_value, reverse=True)
    for task, rs in by_task.items():
        out.append(f"#### {task} ({rs[0]['metric']}; {'higher' if HIGHER_IS_BETTER[task] else 'lower'} is better)\n")
        out.append("| method | " + " | ".join(budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        methods = sorted({r["method"] for r in rs}, key=method_order)
        if main_methods is not None:
            methods = [m for m in methods if m in main_methods]
        for m in methods:
            cells = []
            for b in budgets:
                hit = [r for r in rs if r["method"] == m and (r["budget"] == b or m == "dense")]
                if not hit:
                    cells.append("")
                    continue
                r = hit[0]
                rel = "" if math.isnan(r["rel_dense"]) or m == "dense" else f" ({100 * r['rel_dense']:.0f}%)"
                cells.append(f"{_fmt(task, r['score'])}{rel}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


STYLE = {  # method: (colour, marker, line style)
    "sparq-sketch": ("tab:red", "o", "-"),
    "sparq": ("tab:blue", "s", "-"),
    "topk": ("tab:gray", "^", "-."),
    "quest": ("tab:orange", "D", "-"),
    "h2o": ("tab:purple", "v", "-"),
    "streaming": ("tab:green", "x", "-"),
}


def plot(rows: list[dict[str, Any]], records: list[dict[str, Any]], out_dir: Path, heat_budget: str = "1/8") -> list[Path]:
    """score vs fraction of data read (a line per method, per task); needle depth x length heatmaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = sorted({r["task"] for r in rows}, key=_task_order)
    model = rows[0]["model"] if rows else ""
    for task in tasks:
        rs = [r for r in rows if r["task"] == task]
        fig, ax = plt.subplots(figsize=(6, 4))
        # one line per method spec that ran, variants ("name:opt=...") included
        variants: dict[str, int] = defaultdict(int)
        for m in sorted({r["method"] for r in rs}, key=method_order):
            pts = sorted([r for r in rs if r["method"] == m], key=lambda r: r["fraction"])
            if m.split(":")[0] == "dense":
                ax.axhline(pts[0]["score"], color="black", ls="--", lw=1, label=m)
                continue
            color, marker, ls, face = _style(m, variants[m.split(":")[0]])
            if ":" in m:
                variants[m.split(":")[0]] += 1
            ax.plot([p["fraction"] for p in pts], [p["score"] for p in pts], color=color, marker=marker,
                    ms=5, lw=1.6 if ":" not in m else 1.2, ls=ls, fillstyle=face, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of dense attention data read")
        ax.set_ylabel(rs[0]["metric"])
        ax.set_title(f"{model}: {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"{task}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    needle = [r for r in records if r["task"] == "passkey" and (r["budget"] == heat_budget or r["method"] == "dense")]
    if needle:
        methods = sorted({r["method"] for r in needle}, key=method_order)
        lengths = sorted({r["meta_length"] for r in needle})
        depths = sorted({r["meta_depth"] for r in needle})
        fig, axes = plt.subplots(1, len(methods), figsize=(2.3 * len(methods), 2.6), squeeze=False)
        for ax, m in zip(axes[0], methods):
            grid = [[_mean([r["score"] for r in needle if r["method"] == m and r["meta_length"] == L
                            and r["meta_depth"] == dp]) for L in lengths] for dp in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{dp:g}" for dp in depths], fontsize=7)
            ax.set_title(m if m == "dense" else f"{m} @{heat_budget}", fontsize=8 if len(m) < 20 else 6)
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        axes[0][0].set_ylabel("needle depth")
        fig.supxlabel("context length (tokens)", fontsize=8)
        fig.tight_layout()
        p = out_dir / "passkey_heatmap.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def report(records: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    rows = summarize(records)
    write_tables(rows, out_dir, meta)
    if rows:
        if importlib.util.find_spec("matplotlib") is None:
            print("sparq eval: matplotlib is not installed, so no PNG plots (pip install 'sparq-attention[plot]')",
                  file=sys.stderr)
        else:
            plot(rows, records, out_dir)
    return rows


def budget_table(rows: list[dict[str, Any]], budget: str, methods: list[str] | None = None) -> str:
    """Tasks x methods at one budget: score (% of dense), with the mean fraction actually read."""
    tasks = sorted({r["task"] for r in rows}, key=_task_order)
    if methods is None:
        methods = sorted({r["method"] for r in rows}, key=method_order)
    head = "| task | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"
    lines = []
    for t in tasks:
        cells = []
        for m in methods:
            hit = [r for r in rows if r["task"] == t and r["method"] == m and (r["budget"] == budget or m == "dense")]
            if not hit:
                cells.append("")
                continue
            r = hit[0]
            rel = "" if m == "dense" or math.isnan(r["rel_dense"]) else f" ({100 * r['rel_dense']:.0f}%)"
            cells.append(f"{_fmt(t, r['score'])}{rel}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    fr = []
    for m in methods:
        fs = [r["fraction"] for r in rows if r["method"] == m and (r["budget"] == budget or m == "dense")]
        fr.append(f"{_mean(fs):.3f}" if fs else "")
    lines.append("| *fraction read* | " + " | ".join(fr) + " |")
    return head + "\n".join(lines) + "\n"
