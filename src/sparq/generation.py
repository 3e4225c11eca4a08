"""Generation with a chosen method, timed and metered: what `sparq generate` and `sparq demo` run."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from . import hf
from .config import SparQConfig
from .methods import DecodeInputs, DecodeMethod, Dense, SparQ


@dataclass(frozen=True)
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

    def observe_prefill(self, *args: Any, **kwargs: Any) -> None:
        self.inner.observe_prefill(*args, **kwargs)

    @property
    def fraction_read(self) -> float:
        return self.counts["read"] / self.counts["dense"] if self.counts["dense"] else float("nan")


def make_method(
    method: str,
    head_dim: int,
    *,
    compression: float = 8.0,
    r: int | None = None,
    k: int | None = None,
    local_window: int | None = None,
    reallocate: bool = True,
) -> DecodeMethod:
    """'dense', 'sparq' (from a compression target, explicit r/k/local_window overriding it), or
    any spec of the method registry (e.g. 'sparq-sketch:local=0') at 1/compression of dense data."""
    if method == "dense":
        return Dense()
    if method != "sparq":
        from .methods.registry import build_method

        if not compression >= 1:
            raise ValueError(f"compression must be >= 1, got {compression}")
        return build_method(method, 1.0 / compression, head_dim)
    base = SparQConfig.from_compression(compression, head_dim=head_dim, reallocate=reallocate)
    if r is None and k is None and local_window is None:
        return SparQ(base)
    k_fixed = k is not None
    cfg = SparQConfig(
        r=r if r is not None else base.r,
        k=k if k_fixed else base.k,
        local_window=local_window if local_window is not None else 0,
        reallocate=reallocate,
        k_fraction=0.0 if k_fixed else base.k_fraction,
        local_fraction=0.0 if local_window is not None else base.local_fraction,
    )
    return SparQ(cfg)


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
