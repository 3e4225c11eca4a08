"""SparQ settings: how many key dimensions step 1 reads (r) and how many positions step 2 keeps (k)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SparQConfig:
    """Settings of one SparQ decode step.

    r: key dimensions step 1 reads (all of them when r >= head_dim).
    k: positions step 2 keeps; with ``k_fraction > 0`` this is the minimum and the
       budget grows with the sequence: ``k(S) = max(k, ceil(k_fraction * S))``.
    local_window: the most recent positions always kept (part of k, so <= k).
       With ``local_fraction > 0`` it grows with k: ``max(local_window, round(local_fraction * k(S)))``.
    reallocate: step 3, mix the output with the mean of V by the approximate mass not kept.
    """

    r: int
    k: int
    local_window: int = 0
    reallocate: bool = True
    k_fraction: float = 0.0
    local_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("r", "k", "local_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SparQConfig.{name} must be an int, got {type(value).__name__}")
        if not isinstance(self.reallocate, bool):
            raise TypeError(f"SparQConfig.reallocate must be a bool, got {type(self.reallocate).__name__}")
        if self.r < 1:
            raise ValueError(f"SparQConfig.r must be >= 1, got {self.r}")
        if self.k < 1:
            raise ValueError(f"SparQConfig.k must be >= 1, got {self.k}")
        if not 0 <= self.local_window <= self.k:
            raise ValueError(f"SparQConfig.local_window must be in [0, k={self.k}], got {self.local_window}")
        if not (0.0 <= self.k_fraction <= 1.0) or math.isnan(self.k_fraction):
            raise ValueError(f"SparQConfig.k_fraction must be in [0, 1], got {self.k_fraction}")
        if not (0.0 <= self.local_fraction <= 1.0) or math.isnan(self.local_fraction):
            raise ValueError(f"SparQConfig.local_fraction must be in [0, 1], got {self.local_fraction}")

    # Budgets for a sequence of `length` valid positions. Both are capped at the length,
    # so k >= length means "keep everything" and the step equals dense attention.
    def k_for(self, length: int) -> int:
        k = max(self.k, math.ceil(self.k_fraction * length))
        return min(k, length)

    def local_for(self, length: int) -> int:
        k = self.k_for(length)
        return min(k, max(self.local_window, round(self.local_fraction * k)))

    @classmethod
    def from_compression(
        cls,
        compression: float,
        head_dim: int,
        *,
        min_k: int = 64,
        local_fraction: float = 0.25,
        reallocate: bool = False,
    ) -> "SparQConfig":
        """Settings that read about ``1/compression`` of dense attention's data.

        The paper's accounting, per KV head and decode step, in elements: dense attention
        reads K and V, ``2 * S * d``; SparQ reads ``r`` columns of K (``S * r``) in step 1
        and ``k`` full rows of K and V (``2 * k * d``) in step 2. Splitting the budget evenly,
        ``r = d / c`` and ``k = S / (2c)`` give ``(S*d/c + S*d/c) / (2*S*d) = 1/c``.
        k grows with the sequence length (``k_fraction = 1/(2c)``), with ``min_k`` as a floor
        so short contexts keep enough positions; a quarter of k is a local window, as in the paper.
        Reallocation is off by default: in our evaluation (docs/EVAL.md) it was as good or better
        off, on both models (the authors also turned it off for Llama 3 and Mistral).
        """
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(compression, (int, float)) or not compression >= 1:
            raise ValueError(f"compression must be a number >= 1, got {compression!r}")
        if not 0.0 <= local_fraction <= 1.0:
            raise ValueError(f"local_fraction must be in [0, 1], got {local_fraction}")
        r = max(1, round(head_dim / compression))
        return cls(
            r=r,
            k=max(1, int(min_k)),
            local_window=0,
            reallocate=reallocate,
            k_fraction=1.0 / (2.0 * compression),
            local_fraction=local_fraction,
        )

    def data_fraction(self, length: int, head_dim: int) -> float:
        """Fraction of dense attention's K/V reads one step makes (paper accounting)."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        k = self.k_for(length)
        if k >= length:  # everything kept: steps 1 and 2 collapse into dense attention
            return 1.0
        r = min(self.r, head_dim)
        return (length * r + 2 * k * head_dim) / (2 * length * head_dim)
