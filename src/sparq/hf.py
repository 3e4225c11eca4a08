"""Hugging Face integration: SparQ (or any DecodeMethod) for decode steps, dense prefill.

No model file is patched. Importing this module registers an attention function and its mask
function with transformers' registries under the name "sparq" (`import sparq` arranges that for
the moment transformers' modeling code loads, so ``from_pretrained(..., attn_implementation="sparq")``
works after a plain ``import sparq``). `enable` checks that the architecture really routes its
attention through that registry (and has nothing our methods would ignore, such as GPT-OSS's
attention sinks) and refuses it otherwise, switches the model to "sparq", and tags each
attention module with the method to use. The attention function
  * runs transformers' SDPA attention for prefill (several query tokens), for layers left dense
    (sliding-window layers of Gemma 3 and the like) and for untagged modules;
  * runs the method for single-token decode steps, over the valid (unpadded) positions read off
    the attention mask, with the per-layer state that `SparQCache` keeps.
A forward pre-hook gives the attention function the current cache and, when `generate` starts
with an empty plain `DynamicCache`, swaps in a `SparQCache`.
`enable` (fast_loop=True, the default) also gives the model an instance-level `generate` that
hands greedy and sampled decoding of a family the fast loop runs to `FastDecoder` through
generate's `custom_generate` hook (`hf_generate`); everything above is then what other requests
(and other families) run.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .caches.dynamic import SparQCache
from .config import SparQConfig
from .methods import DecodeInputs, DecodeMethod, SparQ
from .methods.registry import as_method

ATTN_NAME = "sparq"
_METHOD_ATTR = "_sparq_method"
_CTX_ATTR = "_sparq_context"


class _Context:
    """What `enable` leaves on the model so `disable` can undo it exactly."""

    def __init__(self, previous_impl: str | None, hook: Any, modules: list[nn.Module]) -> None:
        self.previous_impl = previous_impl
        self.hook = hook
        self.modules = modules
        self._cache: weakref.ref | None = None
        self.cache_arg = "past_key_values"  # the model's keyword for the cache (see _pre_forward)
        # model.generate through the fast loop (`hf_generate`): on or off, and the decoder kept between calls
        self.fast_loop = False
        self.decoder: Any = None
        self.decoder_method: Any = None
        self.decoder_kwargs: dict[str, Any] = {}

    @property
    def cache(self) -> Any:
        """The cache of the forward pass in progress (set by `_pre_forward`). Held weakly: whoever runs
        the pass holds it, and once they drop it it is freed. A strong reference kept the last call's
        whole KV cache alive until the next forward: after `generate_batch`, transformers' paged
        cache (16 GiB in `sparq bench serve`, which then held two caches at once at the next run's start)."""
        return self._cache() if self._cache is not None else None

    @cache.setter
    def cache(self, cache: Any) -> None:
        self._cache = weakref.ref(cache) if cache is not None else None


def _valid_positions(attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """[B, S] bool: the positions the decode token may attend to, read off the 4D mask."""
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    row = attention_mask[:, 0, -1, :seq_len]  # [B, S]; the head dimension is broadcast
    if row.dtype == torch.bool:
        valid = row
    else:  # additive float mask: 0 where allowed, a large negative number where not
        valid = row > torch.finfo(row.dtype).min / 2
    return valid.expand(batch, seq_len)


def sparq_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: query [B, Hq, L, d]; key, value [B, Hkv, S, d]."""
    method: DecodeMethod | None = getattr(module, _METHOD_ATTR, None)
    batch, _, q_len, head_dim = query.shape
    if method is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("sparq does not support attention logit soft-capping (Gemma 2 style)")
    scale = scaling if scaling is not None else head_dim**-0.5
    ctx: _Context | None = getattr(module, _CTX_ATTR, None)
    cache = ctx.cache if ctx is not None else None
    seq_len = key.shape[2]

    if q_len > 1:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if isinstance(cache, SparQCache):
            # Valid positions for the prefill's last token = the real (non-padding) tokens.
            valid = _valid_positions(attention_mask, batch, seq_len, key.device)
            s = cache.sparq_state(module.layer_idx, key, value, valid, rebuild=True, method=method)
            method.observe_prefill(query, key, value, valid, scale, s.state)
        return out

    valid = _valid_positions(attention_mask, batch, seq_len, key.device)
    x = DecodeInputs(query=query[:, :, 0, :], key=key, value=value, valid=valid, scale=scale)
    if isinstance(cache, SparQCache):
        s = cache.sparq_state(module.layer_idx, key, value, valid, method=method)
        x.key_t, x.value_sum, x.state, x.plans = s.key_t, s.value_sum, s.state, cache.plans
        if s.lengths is not None:  # one valid run per row: the kernels read the cache in place
            x.lengths = s.lengths
            x.starts = s.starts if s.left_padded else None
            x.sketch = s.sketch
    out = method.attend(x)  # [B, Hq, d]
    return out[:, None, :, :], None  # [B, 1, Hq, d]


DEFAULT_COMPRESSION = 8  # what a model loaded with attn_implementation="sparq" runs: 1/8 of dense data
_DEFAULTED = "_sparq_defaulted"


def _attention_entry(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """What transformers calls under the name "sparq". A module `enable` switched on goes straight
    to `sparq_attention_forward`. A module of a model loaded with ``attn_implementation="sparq"``
    and never passed to `enable` gets the default method first (`methods.default_method` at
    1/DEFAULT_COMPRESSION), without the incremental cache that `enable` adds."""
    if getattr(module, _CTX_ATTR, None) is None and not getattr(module, _DEFAULTED, False):
        _adopt_default(module, query.shape[-1], kwargs)
    return sparq_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _adopt_default(module: nn.Module, head_dim: int, kwargs: dict[str, Any]) -> None:
    if kwargs.get("s_aux") is not None or _has_sinks(module):
        raise ValueError(f"attn_implementation='sparq': {type(module).__name__} has learned attention sinks, which "
                         f"sparq's methods would ignore (the output would silently differ from dense)")
    if not _stays_dense(module) and hasattr(module, "layer_idx"):
        from .methods.registry import DEFAULT_SPEC, default_method

        setattr(module, _METHOD_ATTR, default_method(1 / DEFAULT_COMPRESSION, head_dim))
        if not _warned:
            _warned.append(True)
            warnings.warn(f"sparq: this model was loaded with attn_implementation='sparq' and not passed to "
                          f"sparq.enable: running the default method, {DEFAULT_SPEC} at 1/{DEFAULT_COMPRESSION} "
                          f"(sparq.methods.default_method(1/{DEFAULT_COMPRESSION}, head_dim={head_dim})), without the "
                          f"incremental cache; sparq.enable(model, config) chooses the method and adds the cache",
                          stacklevel=2)
    setattr(module, _DEFAULTED, True)


_warned: list[bool] = []


def register() -> None:
    """Register "sparq" with transformers' attention and mask registries (idempotent; importing
    `sparq.hf` does it). After it, ``from_pretrained(..., attn_implementation="sparq")`` loads a
    model that runs the default method (see `_attention_entry`); `enable` picks another."""
    AttentionInterface.register(ATTN_NAME, _attention_entry)
    # The mask function must be registered too, or padded batches silently get no mask.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    # "paged|sparq": the same methods inside transformers' continuous batching (`sparq.serving`);
    # CB turns "sparq" into it by its own "paged|" convention (transformers 5.17/5.18)
    from . import serving

    serving.register()


_register = register  # the old private name


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


def _stays_dense(module: nn.Module) -> bool:
    """Sliding-window layers already read a short window: SparQ would only add work there."""
    return (
        getattr(module, "layer_type", None) == "sliding_attention"
        or bool(getattr(module, "is_sliding", False))
        or getattr(module, "sliding_window", None) is not None
    )


def _has_sinks(module: nn.Module) -> bool:
    """Learned attention-sink logits (GPT-OSS's `sinks`, passed to the attention function as
    `s_aux`): a softmax column our methods do not have."""
    return isinstance(getattr(module, "sinks", None), Tensor)


def check_supported(model: PreTrainedModel, modules: list[nn.Module] | None = None) -> None:
    """ValueError naming the architecture and why, where `enable` would be a silent no-op or silently
    wrong: the model class does not route attention through transformers' attention interface (its
    `_supports_attention_backend` flag is off: Bloom, Falcon, MPT and other older code paths never
    call a registered function, so SparQ would never run), its attention has learned sinks
    (GPT-OSS), or it uses attention logit soft-capping (Gemma 2)."""
    name = type(model).__name__
    arch = getattr(model.config, "model_type", None) or name
    if not getattr(type(model), "_supports_attention_backend", False):
        raise ValueError(
            f"sparq does not support {name} ({arch}): its attention does not go through transformers' attention "
            f"interface (the class's _supports_attention_backend is False), so SparQ would never run. Supported "
            f"architectures are those that do, e.g. Llama, Mistral, Qwen2/3, Gemma 3, GPT-NeoX, Phi-3 (README: "
            f"'What the Hugging Face path supports')")
    text_config = model.config.get_text_config(decoder=True)
    if getattr(text_config, "attn_logit_softcapping", None):
        raise ValueError(f"sparq does not support {name} ({arch}): attention logit soft-capping (Gemma 2 style) is "
                         f"not implemented by sparq's methods")
    sinks = [m for m in (modules if modules is not None else _attention_modules(model)) if _has_sinks(m)]
    if sinks:
        raise ValueError(f"sparq does not support {name} ({arch}): its attention has learned attention sinks "
                         f"({type(sinks[0]).__name__}.sinks), which sparq's methods would ignore, so decoding "
                         f"would silently differ from dense attention")


def _head_dim(model: PreTrainedModel, modules: list[nn.Module]) -> int:
    d = getattr(modules[0], "head_dim", None) if modules else None
    if isinstance(d, int) and d > 0:
        return d
    c = model.config.get_text_config(decoder=True)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def cache_arg(model: nn.Module) -> str:
    """The keyword `model.forward` takes its KV cache under: `cache` from transformers 5.24 on
    (`past_key_values` is then a deprecated alias), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _pre_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    ctx: _Context = getattr(model, _CTX_ATTR)
    # transformers >= 5.24 names the argument `cache` (`past_key_values` is a deprecated alias that
    # loses to `cache` when both are given): swap the cache under whichever name is in use
    name = next((n for n in ("cache", "past_key_values") if kwargs.get(n) is not None), ctx.cache_arg)
    cache = kwargs.get(name)
    use_cache = kwargs.get("use_cache", getattr(model.config, "use_cache", True))
    if use_cache and (cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)):
        cache = SparQCache(config=model.config)
        kwargs[name] = cache
    ctx.cache = cache
    return args, kwargs


def enable(model: PreTrainedModel, config: SparQConfig | DecodeMethod, *, fast_loop: bool = True,
           **decoder_kwargs: Any) -> PreTrainedModel:
    """Switch the model's decode steps to SparQ (or another DecodeMethod); prefill stays dense.

    fast_loop (default on): `model.generate` decodes greedy and sampled requests in the fast loop
    (`FastDecoder`: static cache, CUDA graphs) when the model's family is one it runs, keeping
    generate's contract (logits processors, stopping criteria, streamers, output format); other
    requests run transformers' loop over `SparQCache`, with a warning naming the reason once (see
    `sparq.hf_generate`). fast_loop=False: always transformers' loop. decoder_kwargs go to the
    `FastDecoder` (e.g. prefill_chunk, compile).

    Calling it again replaces the method. Returns the model for chaining. Raises ValueError,
    naming the architecture and the reason, for a model where SparQ would never run or would be
    wrong (see `check_supported`), and for a `SparQConfig.from_compression` config made for
    another head size.
    """
    method = as_method(config)  # the same shorthand the fast loop takes
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    check_supported(model)
    modules = [m for m in _attention_modules(model) if not _stays_dense(m)]
    if not modules:
        raise ValueError(f"found no attention layers to switch in {type(model).__name__}")
    if isinstance(method, SparQ):
        method.config.check_head_dim(_head_dim(model, modules), f"{type(model).__name__}")
    if hasattr(model, _CTX_ATTR):
        disable(model)
    register()
    previous = model.config._attn_implementation
    hook = model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    ctx = _Context(previous, hook, modules)
    ctx.cache_arg = cache_arg(model)
    ctx.fast_loop, ctx.decoder_kwargs = fast_loop, decoder_kwargs
    setattr(model, _CTX_ATTR, ctx)
    for m in _attention_modules(model):
        setattr(m, _CTX_ATTR, ctx)
    for m in modules:
        setattr(m, _METHOD_ATTR, method)
    model.set_attn_implementation(ATTN_NAME)
    if fast_loop:
        from . import hf_generate

        hf_generate.install(model)
    return model


def disable(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `enable`: the previous attention implementation, no hooks, no tags."""
    ctx: _Context | None = getattr(model, _CTX_ATTR, None)
    if ctx is None:
        return model
    ctx.hook.remove()
    from . import hf_generate

    hf_generate.uninstall(model)
    ctx.decoder = None  # its static cache is freed with it
    for m in model.modules():
        for attr in (_METHOD_ATTR, _CTX_ATTR, _DEFAULTED):
            if attr in m.__dict__:
                delattr(m, attr)
    model.set_attn_implementation(ctx.previous_impl or "sdpa")
    return model


def is_enabled(model: nn.Module) -> bool:
    return hasattr(model, _CTX_ATTR)


@contextlib.contextmanager
def enabled(model: PreTrainedModel, config: SparQConfig | DecodeMethod, *, fast_loop: bool = True,
            **decoder_kwargs: Any) -> Iterator[PreTrainedModel]:
    """`with sparq.enabled(model, cfg): model.generate(...)` — dense again afterwards (see `enable`)."""
    enable(model, config, fast_loop=fast_loop, **decoder_kwargs)
    try:
        yield model
    finally:
        disable(model)


register()  # on import: `from_pretrained(..., attn_implementation="sparq")` works from here on
