"""sparq: SparQ Attention for decode-time LLM inference that reads a query-selected part of the KV cache.

The distribution is ``sparq-attention`` on PyPI; the import name is ``sparq``.

Importing the package is cheap: torch and transformers load on first use of a name that needs
them (``sparq.sparq_attention``, ``sparq.enable``, ...), so ``sparq --help`` starts quickly.
Import errors are not hidden: a broken transformers surfaces as its own error when
``sparq.enable`` (or another integration name) is first used. ``attn_implementation="sparq"``
is registered with transformers as soon as its modeling code loads (see `sparq._autoregister`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import SparQConfig  # plain Python, no torch

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first access)
_LAZY = {
    "sparq_attention": "api",
    "dense_attention": "api",
    "SparQCache": "caches.dynamic",
    "FastDecoder": "fast",
    "fast_generate": "fast",
    "enable": "hf",
    "disable": "hf",
    "enabled": "hf",
    "is_enabled": "hf",
    "register": "hf",
}
_SUBMODULES = frozenset({
    "api", "caches", "config", "fast", "hf", "kernels", "methods", "models", "reference", "serving", "tools",
})

__all__ = [
    "SparQConfig", "sparq_attention", "dense_attention", "SparQCache",
    "enable", "disable", "enabled", "is_enabled", "register", "FastDecoder", "fast_generate", "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from .api import dense_attention, sparq_attention
    from .caches.dynamic import SparQCache
    from .fast import FastDecoder, fast_generate
    from .hf import disable, enable, enabled, is_enabled, register


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sparq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


# attn_implementation="sparq" at from_pretrained: registered when transformers' modeling code loads
from ._autoregister import install as _install_autoregister  # noqa: E402

_install_autoregister()
