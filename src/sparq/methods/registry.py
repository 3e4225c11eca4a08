"""Method names -> configured methods with matching accounting: ``build_method("h2o", 1/8, 64)``.

A spec string names a method and optional settings, ``name[:key=value]...``, for example
``sparq-sketch:bits=1:local=0.5`` or ``sparq:r=16``; `parse_spec` splits it and `build_method`
builds it for a target fraction of dense attention's data (e.g. 1/8).

Every method spends (about) the same bytes at the same target: its k is solved from its own
accounting after its overheads (see each method's module). ``min_k`` (default 16) is the floor
on rows kept, the same for all methods, so very short contexts may read a little more.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable

from ..config import SparQConfig
from .base import DecodeMethod
from .dense import Dense
from .h2o import H2O
from .quest import Quest
from .sketch import SparQSketch, default_bits
from .sparq import SparQ
from .streaming import Streaming
from .topk import TopK

METHODS = ("dense", "sparq", "sparq-sketch", "streaming", "h2o", "quest", "topk")


def parse_budget(text: str | float) -> float:
    """"1/8" or "0.125" or 0.125 -> 0.125 (must lie in (0, 1])."""
    value = float(Fraction(str(text).strip())) if isinstance(text, str) else float(text)
    if not 0 < value <= 1:
        raise ValueError(f"a budget must be a fraction in (0, 1], got {text!r}")
    return value


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"sparq-sketch:bits=1:local=0" -> ("sparq-sketch", {"bits": "1", "local": "0"})."""
    name, *parts = spec.strip().split(":")
    opts: dict[str, str] = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"method option {part!r} in {spec!r} must look like key=value")
        key, value = part.split("=", 1)
        opts[key.strip()] = value.strip()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return name, opts


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("1", "true", "on", "yes"):
        return True
    if s in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"expected a boolean, got {v!r}")


def _sparq(f: float, d: int, o: dict[str, Any]) -> DecodeMethod:
    min_k = int(o.pop("min_k", 16))
    local = float(o.pop("local", 0.25))
    realloc = _bool(o.pop("realloc", True))
    if f >= 1:  # the whole budget: every position kept, exactly dense attention
        o.pop("r", None)
        cfg = SparQConfig(r=d, k=max(1, min_k), reallocate=realloc, k_fraction=1.0, local_fraction=local)
    elif "r" in o:  # an explicit r: k takes what is left of the budget
        r = min(int(o.pop("r")), d)
        k_frac = max(f - r / (2 * d), 1e-6)
        cfg = SparQConfig(r=r, k=max(1, min_k), reallocate=realloc, k_fraction=min(1.0, k_frac),
                          local_fraction=local)
    else:  # the paper's even split: r = d * f, k = S * f / 2
        cfg = SparQConfig.from_compression(1.0 / f, d, min_k=max(1, min_k), local_fraction=local,
                                           reallocate=realloc)
    return SparQ(cfg)


def _sketch(f: float, d: int, o: dict[str, Any]) -> DecodeMethod:
    return SparQSketch(
        fraction=f,
        bits=int(o.pop("bits", default_bits(f))),
        block=int(o.pop("block", 128)),
        local_fraction=float(o.pop("local", 0.25)),
        reallocate=_bool(o.pop("realloc", True)),
        min_k=int(o.pop("min_k", 16)),
    )


_BUILDERS: dict[str, Callable[[float, int, dict[str, Any]], DecodeMethod]] = {
    "dense": lambda f, d, o: Dense(),
    "sparq": _sparq,
    "sparq-sketch": _sketch,
    "streaming": lambda f, d, o: Streaming(f, sinks=int(o.pop("sinks", 16)), min_k=int(o.pop("min_k", 16))),
    "h2o": lambda f, d, o: H2O(f, recent_fraction=float(o.pop("recent", 0.5)), min_k=int(o.pop("min_k", 16))),
    "quest": lambda f, d, o: Quest(f, page_size=int(o.pop("page", 0)), min_k=int(o.pop("min_k", 16))),
    "topk": lambda f, d, o: TopK(f, min_k=int(o.pop("min_k", 16))),
}


def build_method(name: str, budget: float | str, head_dim: int, **opts: Any) -> DecodeMethod:
    """A configured method for a target fraction of dense data. `name` may be a full spec string
    ("sparq-sketch:bits=1"); keyword options override the spec's."""
    base, spec_opts = parse_spec(name)
    merged: dict[str, Any] = {**spec_opts, **opts}
    f = parse_budget(budget)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    method = _BUILDERS[base](f, head_dim, merged)
    if merged:
        raise ValueError(f"unknown option(s) for {base}: {', '.join(sorted(merged))}")
    return method


def as_method(method: DecodeMethod | SparQConfig) -> DecodeMethod:
    """The method as given, or SparQ(config) for a bare SparQConfig (the shorthand every loop takes)."""
    if isinstance(method, SparQConfig):
        return SparQ(method)
    if not isinstance(method, DecodeMethod):
        raise TypeError(f"expected a SparQConfig or a DecodeMethod (sparq.methods: Dense(), SparQ(config), ..., "
                        f"or build_method(name, budget, head_dim)), got {method!r}")
    return method
