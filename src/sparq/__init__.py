"""sparq: SparQ Attention for decode-time LLM inference that reads a query-selected part of the KV cache."""

from .api import dense_attention, sparq_attention
from .config import SparQConfig

__version__ = "0.1.0"

__all__ = ["SparQConfig", "sparq_attention", "dense_attention", "__version__"]
