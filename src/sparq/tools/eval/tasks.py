"""Evaluation tasks, generated from a seed or read from user files; nothing is fetched at run time.

Every task turns into a list of `Item`s: a prompt (token ids, prefilled densely) and either a
greedy generation to score or a teacher-forced continuation to score (perplexity).

Text for contexts: a user's plain-text file (``--text-file``), or by default the English prose of
the Python language reference that every CPython install carries (`pydoc_data.topics`, PSF
licence), so no text has to be shipped or downloaded.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

TASKS = ("passkey", "kv", "repetition", "perplexity", "qa")


@dataclass
class Item:
    task: str
    item_id: str
    prompt_ids: list[int]
    mode: str  # "generate" or "teacher"
    max_new_tokens: int = 0
    answer: str = ""  # generate: what a correct answer contains / equals
    target_ids: list[int] = field(default_factory=list)  # teacher / repetition: reference tokens
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSizes:
    """How big each task is; presets in `runner.PRESETS`."""

    lengths: tuple[int, ...] = (1000, 2000)  # context lengths in tokens (needle tasks)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # needle depths
    items: int = 4  # items per cell / task
    repetition_context: int = 2000
    repetition_tokens: int = 48
    ppl_context: int = 1500
    ppl_tokens: int = 48
    kv_pairs: int = 100
    qa_items: int = 8


# ----------------------------------------------------------------------------- text
def _prose(text: str) -> list[str]:
    """Paragraphs of running prose: drops indented blocks (code, grammar) and headings."""
    paras, cur = [], []
    for line in text.splitlines():
        if not line.strip():
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        if line.startswith((" ", "\t")) or set(line.strip()) <= set("*=-~^"):
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(line.strip())
    if cur:
        paras.append(" ".join(cur))
    return [p for p in paras if len(p) > 80 and p.count(" ") > 10]


def load_text(path: str | Path | None = None) -> str:
    """Long real text: the user's file, or the prose of Python's bundled language reference."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    from pydoc_data.topics import topics  # stdlib, PSF licence, present in every CPython

    paras: list[str] = []
    for key in sorted(topics):
        paras.extend(_prose(topics[key]))
    return "\n\n".join(paras)


def text_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _wants_bos(tokenizer) else []


def _wants_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


# ----------------------------------------------------------------------------- passkey
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n")


def passkey_items(tokenizer: PreTrainedTokenizerBase, sizes: TaskSizes, seed: int) -> list[Item]:
    """Needle retrieval on a grid of context lengths x depths: a 5-digit pass key hidden in
    repeated filler; the greedy answer must contain it."""
    rng = random.Random(f"passkey-{seed}")
    unit = text_tokens(tokenizer, FILLER)
    items = []
    for length in sizes.lengths:
        for depth in sizes.depths:
            for i in range(sizes.items):
                key = str(rng.randint(10000, 99999))
                needle = text_tokens(tokenizer, f"The pass key is {key}. Remember it. {key} is the pass key. ")
                head = _bos(tokenizer) + text_tokens(tokenizer, PASSKEY_INTRO)
                tail = text_tokens(tokenizer, "\n\nWhat is the pass key? The pass key is")
                n_fill = max(0, length - len(head) - len(tail) - len(needle))
                reps = n_fill // len(unit) + 1
                filler = (unit * reps)[: (n_fill // len(unit)) * len(unit)]
                cut = int(round(depth * (len(filler) // len(unit)))) * len(unit)
                ids = head + filler[:cut] + needle + filler[cut:] + tail
                items.append(Item("passkey", f"L{length}-D{depth:g}-{i}", ids, "generate", 8, key,
                                  meta={"length": length, "depth": depth}))
    return items


# ----------------------------------------------------------------------------- key-value retrieval
def kv_items(tokenizer: PreTrainedTokenizerBase, sizes: TaskSizes, seed: int) -> list[Item]:
    """Key-value retrieval: ``kv_pairs`` lines "key: value" of random 6-letter keys and 5-digit
    values; the prompt ends with one key (at a random depth) and the model must give its value."""
    rng = random.Random(f"kv-{seed}")
    items = []
    for i in range(sizes.items * 2):
        keys: list[str] = []
        while len(keys) < sizes.kv_pairs:
            k = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
            if k not in keys:
                keys.append(k)
        values = [str(rng.randint(10000, 99999)) for _ in keys]
        j = rng.randrange(len(keys))
        body = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
        ids = _bos(tokenizer) + text_tokens(tokenizer, f"{body}\n\n{keys[j]}:")
        items.append(Item("kv", f"kv-{i}", ids, "generate", 6, values[j],
                          meta={"length": len(ids), "depth": j / len(keys)}))
    return items


# ----------------------------------------------------------------------------- repetition
def repetition_items(tokenizer: PreTrainedTokenizerBase, sizes: TaskSizes, seed: int, text: str) -> list[Item]:
    """Copy a span out of a long real-text context: the prompt is the context, a blank line and the
    first 32 tokens of a span from inside it; the score is the number of the span's next tokens
    generated correctly before the first mismatch."""
    rng = random.Random(f"rep-{seed}")
    toks = text_tokens(tokenizer, text)
    n_ctx, n_out, n_cue = sizes.repetition_context, sizes.repetition_tokens, 32
    items = []
    for i in range(sizes.items * 2):
        start = rng.randrange(0, max(1, len(toks) - n_ctx))
        ctx = toks[start: start + n_ctx]
        span = rng.randrange(int(0.05 * n_ctx), n_ctx - n_cue - n_out)
        cue = ctx[span: span + n_cue]
        ids = _bos(tokenizer) + ctx + text_tokens(tokenizer, "\n\n") + cue
        target = ctx[span + n_cue: span + n_cue + n_out]
        items.append(Item("repetition", f"rep-{i}", ids, "generate", n_out, target_ids=target,
                          meta={"length": len(ids), "depth": span / n_ctx}))
    return items


# ----------------------------------------------------------------------------- perplexity
def perplexity_items(tokenizer: PreTrainedTokenizerBase, sizes: TaskSizes, seed: int, text: str) -> list[Item]:
    """Bits per token of a real-text continuation after a long context, teacher forced, with the
    method applied at every step (the first continuation token, predicted by the dense prefill,
    is not scored)."""
    rng = random.Random(f"ppl-{seed}")
    toks = text_tokens(tokenizer, text)
    n = sizes.ppl_context + sizes.ppl_tokens
    items = []
    for i in range(sizes.items):
        start = rng.randrange(0, max(1, len(toks) - n))
        ids = _bos(tokenizer) + toks[start: start + sizes.ppl_context]
        target = toks[start + sizes.ppl_context: start + n]
        items.append(Item("perplexity", f"ppl-{i}", ids, "teacher", target_ids=target,
                          meta={"length": len(ids)}))
    return items


# ----------------------------------------------------------------------------- QA from JSONL
def read_qa_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """SQuAD-like records, one JSON object a line: "context", "question" and the gold answers as
    "answers" (a list of strings, or SQuAD's {"text": [...]}) or "answer" (a string); "id" optional."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        answers = r.get("answers", r.get("answer"))
        if isinstance(answers, dict):
            answers = answers.get("text", [])
        if isinstance(answers, str):
            answers = [answers]
        if not r.get("context") or not r.get("question") or not answers:
            raise ValueError(f"{path}:{n + 1}: a QA record needs context, question and answers")
        rows.append({"id": str(r.get("id", n)), "context": r["context"], "question": r["question"],
                     "answers": [str(a) for a in answers]})
    return rows


# One worked example (invented, so licence-free) teaches the answer format: a few words, one line.
QA_SHOT = ("Answer each question with a few words copied from its context.\n\n"
           "Context: The lighthouse keeper, Ada Lund, moved to Harlow in the spring and painted her door blue.\n"
           "Question: Which town did Ada Lund move to?\nAnswer: Harlow\n\n")


def qa_items(tokenizer: PreTrainedTokenizerBase, sizes: TaskSizes, path: str | Path) -> list[Item]:
    items = []
    for r in read_qa_jsonl(path)[: sizes.qa_items]:
        prompt = QA_SHOT + f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:"
        ids = _bos(tokenizer) + text_tokens(tokenizer, prompt)
        items.append(Item("qa", f"qa-{r['id']}", ids, "generate", 12, json.dumps(r["answers"]),
                          meta={"length": len(ids)}))
    return items


FIRST = ["Nadia", "Tomas", "Irene", "Kofi", "Lena", "Marek", "Priya", "Oscar", "Yuki", "Dario", "Selma", "Hugo"]
LAST = ["Petrov", "Alvarez", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Brennan", "Costa", "Haddad"]
TOWNS = ["Eastbrook", "Marlow", "Quillon", "Stavely", "Ardmore", "Kestrel Bay", "Fenwick", "Oldcastle",
         "Brightwater", "Rosslare", "Dunmere", "Halverton"]
THINGS = ["violin", "telescope", "sailboat", "typewriter", "bicycle", "chessboard", "compass", "lantern"]
COLOURS = ["green", "purple", "orange", "silver", "crimson", "yellow", "turquoise", "brown"]


def make_qa_sample(path: str | Path, text: str, n: int = 16, seed: int = 0, context_words: int = 1200,
                   n_people: int = 2) -> Path:
    """Write a small SQuAD-like JSONL for trying the QA task: real text with a few invented
    biographical facts spread through it, and a question about one of them. Generated from the
    seed, so it carries no third-party licence."""
    rng = random.Random(f"qa-{seed}")
    words = text.split()
    out = []
    for i in range(n):
        start = rng.randrange(0, max(1, len(words) - context_words))
        chunk = words[start: start + context_words]
        people = rng.sample([f"{a} {b}" for a in FIRST for b in LAST], n_people)
        facts = []
        for p in people:
            town, thing, colour = rng.choice(TOWNS), rng.choice(THINGS), rng.choice(COLOURS)
            facts.append((p, town, thing, colour))
        sentences = [f"{p} was born in {t}, owns a {c} {th}, and still lives there." for p, t, th, c in facts]
        for s in sentences:
            pos = rng.randrange(0, len(chunk))
            chunk = chunk[:pos] + s.split() + chunk[pos:]
        p, town, thing, colour = facts[rng.randrange(len(facts))]
        q, a = rng.choice([(f"In which town was {p} born?", town), (f"What colour is the {thing} that {p} owns?", colour)])
        out.append({"id": f"s{i}", "context": " ".join(chunk), "question": q, "answers": [a]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- scoring
def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def score_generation(item: Item, gen_ids: list[int], tokenizer: PreTrainedTokenizerBase) -> tuple[float, str]:
    """(score, decoded text) of one greedy generation."""
    text = tokenizer.decode(gen_ids, skip_special_tokens=True)
    if item.task in ("passkey", "kv"):
        first = re.findall(r"\d+", text)
        return float(bool(first) and first[0] == item.answer), text
    if item.task == "repetition":
        n = 0
        for a, b in zip(gen_ids, item.target_ids):
            if a != b:
                break
            n += 1
        return float(n), text
    if item.task == "qa":
        pred = normalize_answer(text.strip().split("\n")[0])
        golds = [normalize_answer(a) for a in json.loads(item.answer)]
        return float(pred in golds), text
    raise ValueError(f"no generation scorer for task {item.task!r}")


HIGHER_IS_BETTER = {"passkey": True, "kv": True, "repetition": True, "qa": True, "perplexity": False}
SCORE_NAME = {"passkey": "accuracy", "kv": "accuracy", "repetition": "tokens copied", "qa": "exact match",
              "perplexity": "bits per token"}


def build_items(task: str, tokenizer: PreTrainedTokenizerBase, sizes: TaskSizes, seed: int,
                text: Callable[[], str], qa_file: str | Path | None) -> list[Item]:
    if task == "passkey":
        return passkey_items(tokenizer, sizes, seed)
    if task == "kv":
        return kv_items(tokenizer, sizes, seed)
    if task == "repetition":
        return repetition_items(tokenizer, sizes, seed, text())
    if task == "perplexity":
        return perplexity_items(tokenizer, sizes, seed, text())
    if task == "qa":
        if qa_file is None:
            raise ValueError("the qa task reads a JSONL file: pass --qa-file (see sparq.tools.eval.tasks.read_qa_jsonl)")
        return qa_items(tokenizer, sizes, qa_file)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
