"""Generation with a chosen method, timed and metered: what `sparq generate` and `sparq demo` run."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from .. import hf
from ..config import SparQConfig
from ..methods import DecodeInputs, DecodeMethod, SparQ


@dataclass(frozen=True, eq=False)  # hashed by identity: its counts are a dict (the fast loop keys graphs by method)
class Metered(DecodeMethod):
    """Wraps a method and counts the K/V elements its decode steps read, next to dense's count."""

    inner: DecodeMethod
    counts: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "dense": 0.0, "steps": 0})
    name = "metered"

    def attend(self, x: DecodeInputs) -> Tensor:
        batch, num_kv_heads, _, head_dim = x.key.shape
        for length in x.valid.sum(-1).tolist():
            dense = 2.0 * length * head_dim * num_kv_heads
            self.counts["dense"] += dense
            self.counts["read"] += dense * self.inner.data_fraction(int(length), head_dim)
        self.counts["steps"] += 1
        return self.inner.attend(x)

    def data_fraction(self, length: int, head_dim: int) -> float:
        return self.inner.data_fraction(length, head_dim)

    # what the inner method needs from a static cache (the fast loop `generate` hands decoding to
    # builds its cache from these); not graph-safe: counting reads the lengths on the host
    @property
    def static_cache(self) -> bool:  # type: ignore[override]
        return self.inner.static_cache

    @property
    def needs_key_t(self) -> bool:  # type: ignore[override]
        return self.inner.needs_key_t

    @property
    def sketch_spec(self):  # type: ignore[override]
        return self.inner.sketch_spec

    def observe_prefill(self, *args: Any, **kwargs: Any) -> None:
        self.inner.observe_prefill(*args, **kwargs)

    @property
    def fraction_read(self) -> float:
        return self.counts["read"] / self.counts["dense"] if self.counts["dense"] else float("nan")


def make_method(
    method: str,
    head_dim: int,
    *,
    compression: float | str = 8.0,
    r: int | None = None,
    k: int | None = None,
    local_window: int | None = None,
    reallocate: bool | None = None,
) -> DecodeMethod:
    """The method `sparq generate` runs: any spec of the method registry (e.g. 'sparq',
    'sparq-sketch:local=0', 'h2o') at 1/compression of dense data, built exactly as `sparq eval`
    builds it at that budget (`build_method`; SparQ through `SparQConfig.from_compression`).

    r, k, local_window and reallocate are SparQ's explicit settings (plain 'sparq' only): an explicit
    r keeps the budget (k takes what r leaves), an explicit k or local_window fixes that number.
    """
    from ..methods.registry import build_method, parse_budget, parse_spec

    base, opts = parse_spec(method)
    explicit = {n: v for n, v in (("r", r), ("k", k), ("local_window", local_window), ("reallocate", reallocate))
                if v is not None}
    if explicit and base != "sparq":
        raise ValueError(f"{', '.join(explicit)} appl{'ies' if len(explicit) == 1 else 'y'} to the sparq method only, "
                         f"not {base}; give other methods' options in the spec, e.g. sparq-sketch:local=0")
    if explicit and opts:
        raise ValueError(f"give sparq's settings either in the spec ({method}) or as options, not both")
    budget = parse_budget(compression)
    if base != "sparq" or (k is None and local_window is None):
        passed = {}
        if r is not None:
            passed["r"] = r
        if reallocate is not None:
            passed["realloc"] = reallocate
        return build_method(method, budget, head_dim, **passed)
    cfg = SparQConfig.from_compression(1.0 / budget, head_dim, r=r,
                                       **({} if reallocate is None else {"reallocate": reallocate}))
    return SparQ(SparQConfig(
        r=cfg.r,
        k=k if k is not None else cfg.k,
        local_window=local_window if local_window is not None else 0,
        reallocate=cfg.reallocate,
        k_fraction=0.0 if k is not None else cfg.k_fraction,
        local_fraction=0.0 if local_window is not None else cfg.local_fraction,
        head_dim=head_dim,
    ))


def head_dim_of(model: PreTrainedModel) -> int:
    c = model.config.get_text_config(decoder=True)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: int
    prompt_tokens: list[int]
    prefill_s: float
    decode_s: float
    fraction_read: float

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes with the prefill; the rest are decode steps
        steps = self.new_tokens - 1
        return steps * len(self.texts) / self.decode_s if steps > 0 else float("nan")


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    method: DecodeMethod,
    *,
    max_new_tokens: int = 32,
    streamer: Any = None,
    do_sample: bool = False,
) -> GenerationResult:
    """Greedy (or sampled) generation with `method` on decode steps; prefill and decode timed apart."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    metered = Metered(method)
    clock = _StepClock()  # called after each forward: the first call ends the prefill
    with hf.enabled(model, metered), torch.inference_mode():
        clock.start = time.perf_counter()
        out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                             logits_processor=LogitsProcessorList([clock]))
    new = out.shape[1] - enc.input_ids.shape[1]
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return GenerationResult(
        texts=texts,
        new_tokens=new,
        prompt_tokens=enc.attention_mask.sum(-1).tolist(),
        prefill_s=clock.times[0] - clock.start,
        decode_s=max(clock.times[-1] - clock.times[0], 1e-9),
        fraction_read=metered.fraction_read,
    )


class _StepClock(LogitsProcessor):
    """Records when each step's logits are ready (prefill, then one decode step per token)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.times: list[float] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer: PreTrainedTokenizerBase, target_tokens: int = 2000, depth: float = 0.5,
                   seed: int = 0) -> tuple[str, str]:
    """The classic passkey retrieval prompt (a plain completion), about `target_tokens` long.

    Returns (prompt, passkey). `depth` places the key at that fraction of the filler.
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    tail = "What is the pass key? The pass key is"
    fixed = len(tokenizer(head + needle + tail).input_ids)
    per_filler = len(tokenizer(FILLER * 10).input_ids) / 10
    n = max(1, round((target_tokens - fixed) / per_filler))
    before = round(n * depth)
    return head + FILLER * before + needle + FILLER * (n - before) + tail, key
