"""`model.generate` under `sparq.enable(d)` decodes in the fast loop (`FastDecoder`) where it can.

transformers' own decoding loop costs far more per step than attention does (at 16k context a
1B model spends ~100 ms per step in it, ~2 ms in the fast loop), which would hide SparQ's gain.
So `enable` gives the model an instance-level `generate` that calls transformers' own
`GenerationMixin.generate` unchanged (argument handling, generation config, logits processors and
stopping criteria, the streamer's prompt, output format all stay transformers') and only hands it
a decoding method through generate's documented extension point, ``custom_generate=<callable>``.
That callable (`fast_decode`) is transformers' `_sample` loop with the model forward replaced by
the fast loop's prefill and CUDA-graph decode step:

  * greedy and sampled decoding (do_sample, temperature, top-k/p, repetition penalty and every
    other logits processor or warper; num_return_sequences), stopping criteria (max_new_tokens,
    EOS, stop strings, max_time, custom ones), streamers, output_scores / output_logits and
    return_dict_in_generate, left-padded batches (the attention mask; positions as generate
    derives them, i.e. counted over each row's real tokens);
  * for a model whose family the fast loop runs (`sparq.fast.families.family_for`) and a method
    with a static-cache path.

Everything else runs today's path (transformers' loop over `SparQCache`, per-step attention by
the method), and says so once per reason with a `SparQFallbackWarning`: beam search, assisted
and the hub-moved modes, a user-supplied cache, inputs_embeds or position_ids or other model
inputs, output_attentions / output_hidden_states, right padding, synced GPUs, classifier-free
guidance, a custom_generate of the caller's own, a family the fast loop lacks, a method without a
static-cache path. ``sparq.enable(model, cfg, fast_loop=False)`` asks for today's path outright.

Differences from transformers' loop, on the handed-over path: the returned cache
(``return_dict_in_generate=True``) is None (the fast loop's cache is not a transformers Cache; a
later call with the whole sequence as the prompt prefills it again), and the decoder with its
static cache (sized for the longest request so far, rounded up) is kept between calls for reuse
(and its captured CUDA graph) until `sparq.disable` / the end of `sparq.enabled`.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn

_GENERATE_ATTR = "generate"
_ROUND = 256  # the decoder's capacity is rounded up to this, so similar requests reuse it
# model kwargs transformers' generate itself adds (or the caller may pass with their usual meaning)
_KNOWN_MODEL_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep", "cache", "past_key_values",
                       "cache_position"}


class SparQFallbackWarning(UserWarning):
    """`model.generate` under `sparq.enable` runs transformers' decoding loop (today's, slower
    path) instead of the fast loop; the message says why."""


_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sparq: model.generate runs transformers' decoding loop over SparQCache (slower) instead of "
                      f"the fast loop: {reason}", SparQFallbackWarning, stacklevel=_caller_level())


_LIBRARY_DIRS = tuple(f"{os.sep}{name}{os.sep}" for name in ("sparq", "transformers", "torch")) + ("contextlib",)


def _caller_level() -> int:
    """warnings' stacklevel of the first frame outside sparq, transformers and torch (the user's
    generate call), counted from `_fallback`'s call to warn."""
    frame, level = sys._getframe(2), 2
    while frame is not None and any(d in frame.f_code.co_filename for d in _LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def install(model: nn.Module) -> bool:
    """Give `model` the instance-level `generate` described above; False (with a warning) where the
    model already has an instance-level generate (e.g. a Hub custom_generate loaded by
    from_pretrained), which is then left alone."""
    if not hasattr(type(model), "generate"):
        return False
    if _GENERATE_ATTR in model.__dict__:
        if getattr(model.__dict__[_GENERATE_ATTR], "_sparq", False):
            return True
        _fallback("the model already has its own generate (a custom_generate loaded with it); it is left as is")
        return False
    # as transformers itself installs a Hub custom_generate: functools.partial(fn, model)
    bound = functools.partial(_generate, model)
    bound._sparq = True  # type: ignore[attr-defined]
    bound.__doc__ = _generate.__doc__
    model.__dict__[_GENERATE_ATTR] = bound
    return True


def uninstall(model: nn.Module) -> None:
    fn = model.__dict__.get(_GENERATE_ATTR)
    if fn is not None and getattr(fn, "_sparq", False):
        del model.__dict__[_GENERATE_ATTR]


def _ctx(model: nn.Module):
    from .hf import _CTX_ATTR

    return getattr(model, _CTX_ATTR, None)


def _generate(model: nn.Module, *args: Any, **kwargs: Any):
    """The instance-level generate: transformers' generate, with the fast loop as its decoding
    method when the request is one it runs."""
    base = type(model).generate
    try:
        bound = inspect.signature(base).bind(model, *args, **kwargs)
    except TypeError:
        return base(model, *args, **kwargs)  # let transformers raise its own error
    named = dict(bound.arguments)
    named.pop("self", None)
    extra = named.pop("kwargs", {})
    reason = _why_not_before(model, named, extra)
    if reason is not None:
        _fallback(reason)
        return base(model, *args, **kwargs)
    decode = functools.partial(fast_decode, streamer=named.get("streamer"))
    return base(model, **named, **extra, custom_generate=decode)


def _why_not_before(model: nn.Module, named: dict, extra: dict) -> str | None:
    """Why this request cannot go to the fast loop, judged from generate's arguments; None if it may."""
    from transformers.generation.utils import GenerationMode

    ctx = _ctx(model)
    if ctx is None or not getattr(ctx, "fast_loop", False):
        return "fast_loop is off"
    if named.get("custom_generate") is not None:
        return "a custom_generate was given"
    if named.get("assistant_model") is not None:
        return "assisted decoding (assistant_model)"
    if named.get("synced_gpus"):
        return "synced_gpus"
    if named.get("negative_prompt_ids") is not None:
        return "classifier-free guidance (negative_prompt_ids)"
    for name in ("cache", "past_key_values"):
        if extra.get(name) is not None:
            return "a cache was passed in"
    if extra.get("inputs_embeds") is not None:
        return "inputs_embeds"
    if extra.get("position_ids") is not None:
        return "position_ids given"
    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    reason = _method_reason(ctx)
    if reason is not None:
        return reason
    from .fast import family_for

    try:
        family_for(model)
    except ValueError as e:
        return str(e)
    try:
        config, _ = model._prepare_generation_config(named.get("generation_config"), **extra)
        mode = config.get_generation_mode()
    except Exception:  # noqa: BLE001 - transformers' generate will raise it properly
        return "generate's arguments did not validate"
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"{mode.value if hasattr(mode, 'value') else mode} decoding"
    return None


def _method(ctx):
    """The one method every switched layer runs (None if they differ: not something enable does)."""
    first = getattr(ctx.modules[0], "_sparq_method", None) if ctx.modules else None
    return first if all(getattr(m, "_sparq_method", None) is first for m in ctx.modules) else None


def _method_reason(ctx) -> str | None:
    method = _method(ctx)
    if method is None:
        return "the layers run different methods"
    if not getattr(method, "static_cache", False):
        return f"{getattr(method, 'name', type(method).__name__)} has no static-cache path"
    return None


def _why_not_inside(model: nn.Module, input_ids: Tensor, generation_config, model_kwargs: dict) -> str | None:
    """Why the prepared request cannot go to the fast loop; None if it may."""
    from transformers.generation.utils import GenerationMode

    if generation_config.get_generation_mode() not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return "not greedy or sampled decoding"
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "output_attentions / output_hidden_states"
    if generation_config.guidance_scale not in (None, 1, 1.0):
        return "classifier-free guidance (guidance_scale)"
    if not model_kwargs.get("use_cache", True):
        return "use_cache=False"
    unknown = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _KNOWN_MODEL_KWARGS
                     and k not in ("output_attentions", "output_hidden_states"))
    if unknown:
        return f"model inputs the fast loop does not take ({', '.join(unknown)})"
    for name in ("cache", "past_key_values"):
        c = model_kwargs.get(name)
        if c is not None and (getattr(c, "_is_user_defined", False) or c.get_seq_length() > 0):
            return "a cache was passed in"
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        return "no prompt tokens"
    mask = model_kwargs.get("attention_mask")
    if mask is not None:
        if mask.shape != input_ids.shape:
            return "an attention_mask of another shape than input_ids"
        m = mask.to(torch.int64)
        if bool(((m != 0) & (m != 1)).any()) or bool((m[:, 1:] < m[:, :-1]).any()):
            return "an attention_mask that is not left padding (right padding or holes)"
        if bool((m.sum(-1) == 0).any()):
            return "a row with no prompt tokens"
    return None


def _decoder(model: nn.Module, batch: int, need: int):
    """The context's FastDecoder for this batch and capacity, built (or rebuilt) as needed; raises
    ValueError where the fast loop cannot run the model (no family, a config the family refuses)."""
    from .fast import FastDecoder

    ctx = _ctx(model)
    method = _method(ctx)
    dec = ctx.decoder
    if dec is not None and dec.batch == batch and dec.max_len >= need and ctx.decoder_method is method:
        return dec
    ctx.decoder = None
    del dec  # free the old cache before allocating the new one
    max_len = -(-need // _ROUND) * _ROUND
    cfg_max = getattr(model.config, "max_position_embeddings", None)
    if isinstance(cfg_max, int) and need <= cfg_max < max_len:
        max_len = cfg_max
    ctx.decoder = FastDecoder(model, method, batch=batch, max_len=max_len, keep_logits=True, **ctx.decoder_kwargs)
    ctx.decoder_method = method
    return ctx.decoder


def fast_decode(model: nn.Module, input_ids: Tensor, logits_processor, stopping_criteria, generation_config,
                synced_gpus: bool = False, streamer=None, **model_kwargs):
    """A transformers decoding method (the `custom_generate` callable `generate` calls with the
    prepared inputs, processors and criteria): `_sample`'s loop over the fast loop's steps, or
    `_sample` itself where the request is one the fast loop does not run."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

    reason = _why_not_inside(model, input_ids, generation_config, model_kwargs)
    dec = None
    if reason is None:
        mask = model_kwargs.get("attention_mask")
        try:
            dec = _decoder(model, input_ids.shape[0], generation_config.max_length + 1)
        except ValueError as e:
            reason = f"the fast loop cannot run this model ({e})"
    if reason is not None:
        _fallback(reason)
        return GenerationMixin._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                       synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    from .fast import left_align

    mask = mask if mask is not None else torch.ones_like(input_ids)
    aligned, lengths = left_align(input_ids, mask)

    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    return_dict = generation_config.return_dict_in_generate
    scores = () if (return_dict and generation_config.output_scores) else None
    raw_logits = () if (return_dict and generation_config.output_logits) else None
    has_eos_stopping_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = generation_config.do_sample
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    with torch.inference_mode():
        dec.prefill(aligned, lengths)
    first = True
    while True:
        if not first:
            with torch.inference_mode():
                dec.step()
        first = False
        next_token_logits = dec.logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
        next_token_scores = logits_processor(input_ids, next_token_logits)
        if scores is not None:
            scores += (next_token_scores,)
        if raw_logits is not None:
            raw_logits += (next_token_logits,)
        if do_sample:
            probs = nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if unfinished.max() == 0:
            break
        with torch.inference_mode():
            dec.tokens.copy_(next_tokens.to(dec.tokens.device))
    if streamer is not None:
        streamer.end()
    if return_dict:
        # no cache field: the fast loop's static cache stays inside the kept decoder (and the field is
        # `past_key_values` before transformers 5.24, `cache` from it on)
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, attentions=None,
                                         hidden_states=None)
    return input_ids
