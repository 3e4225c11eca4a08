"""Method names -> configured methods with matching accounting: ``build_method("h2o", 1/8, 64)``.

A spec string names a method and optional settings, ``name[:key=value]...``, for example
``sparq-sketch:bits=1:local=0.5`` or ``sparq:r=16``; `parse_spec` splits it and `build_method`
builds it for a target fraction of dense attention's data (e.g. 1/8).

Every method spends (about) the same bytes at the same target: its k is solved from its own
accounting after its overheads (see each method's module). ``min_k`` is the floor on rows kept
(16 for the baselines; SparQ's comes from `SparQConfig.from_compression`, 64), so very short
contexts may read a little more. Every option is checked where it is parsed: a bad value raises
ValueError naming the option and its allowed range.
"""

from __future__ import annotations

import difflib
from fractions import Fraction
from typing import Any, Callable

from ..config import SparQConfig
from . import _check
from .base import DecodeMethod
from .dense import Dense
from .h2o import H2O
from .quest import Quest
from .sketch import SparQSketch, default_bits
from .sparq import SparQ
from .streaming import Streaming
from .topk import TopK

METHODS = ("dense", "sparq", "sparq-sketch", "streaming", "h2o", "quest", "topk")

# The library's default method (what `attn_implementation="sparq"`, `sparq generate` and `sparq demo`
# run, and what the spec "default" names): step 1 from a 2-bit key sketch at 1/8 (bits = 16 f), no
# local window, no reallocation. Chosen by the evaluation of 2026-11-30 (docs/EVAL.md, "Re-evaluation
# at 20+ items per task"): at or above dense on every task on SmolLM2-135M and Gemma 3 270M, where the
# paper's method (spec "sparq") keeps 0-11% on Gemma 3.
DEFAULT_SPEC = "sparq-sketch:local=0:realloc=0"


def default_method(budget: float | str, head_dim: int) -> DecodeMethod:
    """The default method at a target fraction of dense data (`DEFAULT_SPEC`)."""
    return build_method(DEFAULT_SPEC, budget, head_dim)


def parse_budget(text: str | float) -> float:
    """A target fraction of dense attention's data, in (0, 1].

    "1/8", "0.125" and 0.125 mean 1/8; so do "8" and 8 (a plain number above 1 is a compression
    ratio N, read as 1/N, as `sparq generate --compression 8` takes it). "1" is dense. A written
    fraction above 1 ("3/2") is an error.
    """
    hint = "a fraction of dense data such as 1/8 or 0.125, or a compression ratio such as 8"
    try:
        value = Fraction(str(text).strip()) if isinstance(text, str) else Fraction(text)
    except (ValueError, TypeError, ZeroDivisionError):
        raise ValueError(f"a budget must be {hint}; got {text!r}") from None
    if isinstance(text, bool) or value <= 0 or (value > 1 and "/" in str(text)):
        raise ValueError(f"a budget must be {hint}; got {text!r}")
    if value > 1:
        value = 1 / value
    return float(value)


def budget_label(text: str | float) -> str:
    """The canonical spelling of a budget, as records and tables use it: "8", "0.125", "1/8" -> "1/8"."""
    return str(Fraction(parse_budget(text)).limit_denominator(1 << 20))


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"sparq-sketch:bits=1:local=0" -> ("sparq-sketch", {"bits": "1", "local": "0"}). "default"
    (options may follow: "default:bits=1") is `DEFAULT_SPEC` with them."""
    if not isinstance(spec, str):
        raise TypeError(f"a method spec must be a string, got {type(spec).__name__}")
    name, *parts = spec.strip().split(":")
    if name == "default":
        name, *base_parts = DEFAULT_SPEC.split(":")
        parts = base_parts + parts
    opts: dict[str, str] = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"method option {part!r} in {spec!r} must look like key=value")
        key, value = part.split("=", 1)
        opts[key.strip()] = value.strip()
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; known: default, {', '.join(METHODS)}")
    return name, opts


def _min_k(name: str, o: dict[str, Any]) -> int:
    return _check.integer(f"{name} option", "min_k", o.pop("min_k", 16), 1)


def _sparq(f: float, d: int, o: dict[str, Any]) -> DecodeMethod:
    """SparQ at f = 1/N: `SparQConfig.from_compression(N, d)` with its documented defaults (min_k 64,
    local window k/4, reallocation off); the spec's options are passed through."""
    opt = "sparq option"
    kw: dict[str, Any] = {}
    if "r" in o:  # an explicit r: k takes what is left of the budget
        kw["r"] = _check.integer(opt, "r", o.pop("r"), 1)
    if "min_k" in o:
        kw["min_k"] = _check.integer(opt, "min_k", o.pop("min_k"), 1)
    if "local" in o:
        kw["local_fraction"] = _check.number(opt, "local", o.pop("local"), 0.0, 1.0)
    if "realloc" in o:
        kw["reallocate"] = _check.boolean(opt, "realloc", o.pop("realloc"))
    return SparQ(SparQConfig.from_compression(1.0 / f, d, **kw))


def _sketch(f: float, d: int, o: dict[str, Any]) -> DecodeMethod:
    opt = "sparq-sketch option"
    return SparQSketch(
        fraction=f,
        bits=_check.integer(opt, "bits", o.pop("bits", default_bits(f)), 1, 8),
        block=_check.integer(opt, "block", o.pop("block", 128), 1),
        local_fraction=_check.number(opt, "local", o.pop("local", 0.25), 0.0, 1.0),
        reallocate=_check.boolean(opt, "realloc", o.pop("realloc", True)),
        min_k=_min_k("sparq-sketch", o),
    )


def _streaming(f: float, d: int, o: dict[str, Any]) -> DecodeMethod:
    return Streaming(f, sinks=_check.integer("streaming option", "sinks", o.pop("sinks", 16), 0),
                     min_k=_min_k("streaming", o))


def _h2o(f: float, d: int, o: dict[str, Any]) -> DecodeMethod:
    return H2O(f, recent_fraction=_check.number("h2o option", "recent", o.pop("recent", 0.5), 0.0, 1.0),
               min_k=_min_k("h2o", o))


def _quest(f: float, d: int, o: dict[str, Any]) -> DecodeMethod:
    return Quest(f, page_size=_check.integer("quest option", "page (tokens per page; 0 = automatic)",
                                             o.pop("page", 0), 0),
                 min_k=_min_k("quest", o))


_BUILDERS: dict[str, Callable[[float, int, dict[str, Any]], DecodeMethod]] = {
    "dense": lambda f, d, o: Dense(),
    "sparq": _sparq,
    "sparq-sketch": _sketch,
    "streaming": _streaming,
    "h2o": _h2o,
    "quest": _quest,
    "topk": lambda f, d, o: TopK(f, min_k=_min_k("topk", o)),
}
OPTIONS = {  # the options each method's spec takes (for messages and docs)
    "dense": (), "sparq": ("r", "min_k", "local", "realloc"),
    "sparq-sketch": ("bits", "block", "local", "realloc", "min_k"), "streaming": ("sinks", "min_k"),
    "h2o": ("recent", "min_k"), "quest": ("page", "min_k"), "topk": ("min_k",),
}


def build_method(name: str, budget: float | str, head_dim: int, **opts: Any) -> DecodeMethod:
    """A configured method for a target fraction of dense data. `name` may be a full spec string
    ("sparq-sketch:bits=1"); keyword options override the spec's."""
    base, spec_opts = parse_spec(name)
    merged: dict[str, Any] = {**spec_opts, **opts}
    unknown = sorted(set(merged) - set(OPTIONS[base]))
    if unknown:
        known = ", ".join(OPTIONS[base]) or "none"
        raise ValueError(f"unknown option(s) for {base}: {', '.join(unknown)} (it takes: {known})")
    f = parse_budget(budget)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    return _BUILDERS[base](f, head_dim, merged)


def as_method(method: DecodeMethod | SparQConfig) -> DecodeMethod:
    """The method as given, or SparQ(config) for a bare SparQConfig (the shorthand every loop takes)."""
    if isinstance(method, SparQConfig):
        return SparQ(method)
    if not isinstance(method, DecodeMethod):
        raise TypeError(f"expected a SparQConfig or a DecodeMethod (sparq.methods: Dense(), SparQ(config), ..., "
                        f"or build_method(name, budget, head_dim)), got {method!r}")
    return method
