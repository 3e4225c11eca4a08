"""Run tasks x methods x budgets on one model, resumably, prefilling each batch only once.

For each batch of items (left padded), the prompt is prefilled once, densely, into a
`SparQCache`; each (method, budget) then decodes from its own deep copy of that cache (greedy,
or teacher forced for perplexity), with the method applied at every decode step. Every
(model, task, method, budget, item) result is appended as one JSON line to
``<out>/records.jsonl`` and skipped when the run is started again with identical settings.

A record carries ``settings`` (a hash of everything else that changes its result: model, the
task's sizes, seed, text or QA file by content, batch size, device; see `settings_key`) and
``config`` (the built method's full repr, so a changed default or option is a different method).
A rerun only skips records whose settings and config both match; records of other settings stay
in the file but are neither skipped nor reported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ... import hf
from ...caches.dynamic import SparQCache
from ...methods import DecodeMethod, Dense, build_method, parse_budget
from ...methods.h2o import H2O
from .tasks import TASKS, Item, TaskSizes, build_items, load_text, score_generation


@dataclass(frozen=True)
class Run:
    """One (method spec, budget) to evaluate; dense has the single budget "1"."""

    spec: str
    budget: str

    @property
    def key(self) -> str:
        return f"{self.spec}@{self.budget}"


def head_dim_of(model: Any) -> int:
    cfg = model.config.get_text_config(decoder=True)
    d = getattr(cfg, "head_dim", None)
    return int(d) if d else cfg.hidden_size // cfg.num_attention_heads


def plan_runs(methods: list[str], budgets: list[str]) -> list[Run]:
    runs: list[Run] = []
    for spec in methods:
        if spec.split(":")[0] == "dense":
            runs.append(Run(spec, "1"))
            continue
        runs.extend(Run(spec, b) for b in budgets)
    return runs


def _file_id(path: str | Path | None) -> str | None:
    """A file by its content (sha1), so a moved copy matches and an edited one does not."""
    if path is None:
        return None
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


# The task sizes each task's items depend on (the rest of TaskSizes cannot change its records).
TASK_SIZES = {
    "passkey": ("lengths", "depths", "items"),
    "kv": ("items", "kv_pairs"),
    "repetition": ("items", "repetition_context", "repetition_tokens"),
    "perplexity": ("items", "ppl_context", "ppl_tokens"),
    "qa": ("qa_items",),
}
TEXT_TASKS = ("repetition", "perplexity")


def settings_key(model_name: str, task: str, sizes: TaskSizes, *, seed: int, batch_size: int, device: str,
                 text_file: str | Path | None = None, qa_file: str | Path | None = None) -> str:
    """A short hash of every setting besides the method that changes one task's records: the model,
    the task's sizes (the preset acts through them), the seed, the context text (repetition,
    perplexity) or QA file (qa) by content, the batch size (padding) and the device type (which
    also fixes the dtype in `sparq.models.load`). CPU threads are left out on purpose: they only
    change floating-point summation order (as another machine would), and their default follows
    the machine's load, so keying on them would recompute whole runs for nothing."""
    fields = TASK_SIZES.get(task, tuple(asdict(sizes)))
    blob = {"model": model_name, "task": task, "sizes": {f: getattr(sizes, f) for f in fields}, "seed": seed,
            "batch_size": batch_size, "device": str(device).split(":")[0],
            "text": _file_id(text_file) if task in TEXT_TASKS else None,
            "qa": _file_id(qa_file) if task == "qa" else None}
    return hashlib.sha1(json.dumps(blob, sort_keys=True, default=list).encode()).hexdigest()[:16]


def settings_keys(model_name: str, tasks: list[str], sizes: TaskSizes, **kw: Any) -> dict[str, str]:
    """settings_key for each task."""
    return {t: settings_key(model_name, t, sizes, **kw) for t in tasks}


def record_key(r: dict[str, Any]) -> tuple:
    """What makes two records the same result: a resume skips a run only on an equal key."""
    return (r.get("settings"), r.get("config"), r["model"], r["task"], r["method"], r["budget"], r["item"])


def current(records: list[dict[str, Any]], settings: dict[str, str],
            configs: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """The records of these settings (task -> settings_key). configs maps (method spec, budget) to the config this run
    built: those runs keep only records of that config. Where a (task, method, budget, item) still
    has several configs (a spec not in this run, whose default changed between runs), the last
    one written."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("settings") is None or r.get("settings") != settings.get(r["task"]):
            continue
        want = (configs or {}).get((r["method"], r["budget"]))
        if want is not None and r.get("config") != want:
            continue
        latest[(r["model"], r["task"], r["method"], r["budget"], r["item"])] = r
    return list(latest.values())


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by an interrupted run
            continue
    return out


def _batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Batches of at most batch_size items of similar length (within 25%), so little padding."""
    out: list[list[Item]] = []
    for it in sorted(items, key=lambda it: len(it.prompt_ids)):
        if out and len(out[-1]) < batch_size and len(it.prompt_ids) <= 1.25 * len(out[-1][0].prompt_ids):
            out[-1].append(it)
        else:
            out.append([it])
    return out


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s)
        mask[i, n - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor, observer: DecodeMethod) -> tuple[SparQCache, torch.Tensor]:
    """Dense prefill into a SparQCache; observer.observe_prefill records what it needs (H2O)."""
    hf.enable(model, observer)
    cache = SparQCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{hf.cache_arg(model): cache},
                use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1, :].float()


@torch.inference_mode()
def decode(model: Any, method: DecodeMethod, cache: SparQCache, logits: torch.Tensor, mask: torch.Tensor,
           steps: int, head_dim: int, forced: torch.Tensor | None = None,
           finished: Callable[[torch.Tensor], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Greedy (forced=None) or teacher-forced decoding of `steps` tokens from a prefilled cache.

    Returns (tokens [B, steps], log-probs of those tokens [B, steps] (natural log), mean data
    fraction per sequence). Token 0 comes from the dense prefill's logits; the method decides
    every later one. `finished(tokens so far)` may end the loop early once no later token can
    change any score (e.g. every copy has already mismatched).
    """
    hf.enable(model, method)
    cache_kw = {hf.cache_arg(model): cache}
    b = mask.shape[0]
    lengths = mask.sum(-1).tolist()
    toks, logps, fracs = [], [], [[] for _ in range(b)]
    for t in range(steps):
        logp = torch.log_softmax(logits, -1)
        nxt = forced[:, t] if forced is not None else logp.argmax(-1)
        toks.append(nxt)
        logps.append(logp.gather(-1, nxt[:, None])[:, 0])
        if t == steps - 1 or (finished is not None and finished(torch.stack(toks, 1))):
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=-1)
        for i in range(b):
            fracs[i].append(method.data_fraction(int(lengths[i]) + t + 1, head_dim))
        pos = (mask.sum(-1, keepdim=True) - 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, **cache_kw, use_cache=True)
        logits = out.logits[:, -1, :].float()
    frac = [sum(f) / len(f) if f else 1.0 for f in fracs]
    return torch.stack(toks, 1), torch.stack(logps, 1), frac


def evaluate(
    model: Any,
    tokenizer: Any,
    model_name: str,
    tasks: list[str],
    methods: list[str],
    budgets: list[str],
    out_dir: Path,
    sizes: TaskSizes,
    seed: int = 0,
    batch_size: int = 4,
    qa_file: str | Path | None = None,
    text_file: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run everything not yet in ``out_dir/records.jsonl`` with these exact settings; return the
    records of these settings (see `current`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path = out_dir / "records.jsonl"
    records = load_records(rec_path)
    # every task's key, so the report also shows other tasks run earlier with these same settings
    settings = settings_keys(model_name, list(dict.fromkeys([*TASKS, *tasks])), sizes, seed=seed,
                             batch_size=batch_size, device=model.device.type, text_file=text_file, qa_file=qa_file)
    done = {record_key(r) for r in records}
    other = sum(r.get("settings") not in settings.values() for r in records)
    if other:
        log(f"{rec_path}: {other} records of other settings (model, sizes, seed, files, batch size or device) "
            f"are ignored")
    d = head_dim_of(model)
    for b in budgets:
        parse_budget(b)
    runs = plan_runs(methods, budgets)
    built = {run.key: build_method(run.spec, 1.0 if run.budget == "1" else run.budget, d) for run in runs}
    config = {key: repr(m) for key, m in built.items()}

    def key_of(task: str, run: Run, item: str) -> tuple:
        return (settings[task], config[run.key], model_name, task, run.spec, run.budget, item)
    text_cache: dict[str, str] = {}

    def text() -> str:
        if "t" not in text_cache:
            text_cache["t"] = load_text(text_file)
        return text_cache["t"]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for task in tasks:
        items = build_items(task, tokenizer, sizes, seed, text, qa_file)
        todo = [(it, run) for it in items for run in runs if key_of(task, run, it.item_id) not in done]
        if not todo:
            log(f"{task}: all {len(items) * len(runs)} results already in {rec_path}")
            continue
        bar = tqdm(total=len(todo), desc=f"{model_name} {task}", unit="result")
        for batch in _batches(items, batch_size):
            need = [run for run in runs if any(key_of(task, run, it.item_id) not in done for it in batch)]
            if not need:
                continue
            ids, mask = _left_pad([it.prompt_ids for it in batch], pad)
            h2o_needed = any(isinstance(built[r.key], H2O) for r in need)
            observer = H2O(1.0) if h2o_needed else Dense()
            t0 = time.time()
            cache, logits = prefill(model, ids, mask, observer)
            t_prefill = time.time() - t0
            if batch[0].mode == "teacher":
                n = min(len(it.target_ids) for it in batch)
                forced = torch.tensor([it.target_ids[:n] for it in batch])
                steps = n
            else:
                forced, steps = None, max(it.max_new_tokens for it in batch)
            finished = _stopper(batch, tokenizer)
            for run in need:
                method = built[run.key]
                t0 = time.time()
                toks, logps, fracs = decode(model, method, copy.deepcopy(cache), logits, mask.clone(),
                                            steps, d, forced, finished)
                t_dec = time.time() - t0
                with rec_path.open("a", encoding="utf-8") as fh:
                    for i, it in enumerate(batch):
                        if key_of(task, run, it.item_id) in done:
                            continue
                        rec: dict[str, Any] = {
                            "model": model_name, "task": task, "method": run.spec, "budget": run.budget,
                            "settings": settings[task], "config": config[run.key],
                            "item": it.item_id, "fraction": fracs[i], "label": method.label,
                            "length": len(it.prompt_ids), **{f"meta_{k}": v for k, v in it.meta.items()},
                            "prefill_s": round(t_prefill, 3), "decode_s": round(t_dec, 3), "batch": len(batch),
                        }
                        if it.mode == "teacher":
                            lp = logps[i, 1:]  # token 0 was predicted by the dense prefill
                            rec["score"] = float(-lp.mean() / math.log(2))
                        else:
                            gen = toks[i, : it.max_new_tokens].tolist()
                            rec["score"], rec["output"] = score_generation(it, gen, tokenizer)
                        fh.write(json.dumps(rec) + "\n")
                        records.append(rec)
                        done.add(record_key(rec))
                        bar.update(1)
            del cache
        bar.close()
    hf.disable(model)
    return current(records, settings, {(run.spec, run.budget): config[run.key] for run in runs})


def _stopper(batch: list[Item], tokenizer: Any) -> Callable[[torch.Tensor], bool] | None:
    """When generating further cannot change any item's score: every repetition item has
    mismatched its target, or every QA answer has reached a new line."""
    task = batch[0].task
    if task == "repetition":
        targets = [it.target_ids for it in batch]

        def done(toks: torch.Tensor) -> bool:
            n = toks.shape[1]
            return all(toks[i].tolist() != t[:n] for i, t in enumerate(targets))
        return done
    if task == "qa":
        def done_qa(toks: torch.Tensor) -> bool:
            return all("\n" in tokenizer.decode(row, skip_special_tokens=True).strip() for row in toks.tolist())
        return done_qa
    return None
