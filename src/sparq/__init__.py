"""sparq: SparQ Attention for decode-time LLM inference that reads a query-selected part of the KV cache."""

from .api import dense_attention, sparq_attention
from .config import SparQConfig

try:  # the core works without transformers; the integration needs it
    from .cache import SparQCache
    from .fast import FastDecoder, fast_generate
    from .hf import disable, enable, enabled, is_enabled
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"

__all__ = [
    "SparQConfig", "sparq_attention", "dense_attention", "SparQCache",
    "enable", "disable", "enabled", "is_enabled", "FastDecoder", "fast_generate", "__version__",
]
