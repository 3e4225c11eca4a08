"""SparQ settings: how many key dimensions step 1 reads (r) and how many positions step 2 keeps (k)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _check_number(owner: str, name: str, value: object) -> float:
    """A real number (int or float, not bool); TypeError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}.{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(frozen=True)
class SparQConfig:
    """Settings of one SparQ decode step.

    r: key dimensions step 1 reads. ``r >= head_dim`` reads all of them (step 1 is then exact),
       so a config with r larger than a model's head size is accepted and means "every dimension".
    k: positions step 2 keeps; with ``k_fraction > 0`` this is the minimum and the
       budget grows with the sequence: ``k(S) = max(k, ceil(k_fraction * S))``.
    local_window: the most recent positions always kept (part of k, so <= k).
       With ``local_fraction > 0`` it grows with k: ``max(local_window, round(local_fraction * k(S)))``.
    reallocate: step 3, mix the output with the mean of V by the approximate mass not kept.
    head_dim: the head size the config was sized for (set by `from_compression`, whose r is a
       share of it); `sparq.enable` refuses a model whose heads have another size, where the
       budget would silently differ. None (the default for hand-made configs): any head size.
    """

    r: int
    k: int
    local_window: int = 0
    reallocate: bool = True
    k_fraction: float = 0.0
    local_fraction: float = 0.0
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("r", "k", "local_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SparQConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        if not isinstance(self.reallocate, bool):
            raise TypeError(f"SparQConfig.reallocate must be a bool, got {type(self.reallocate).__name__}")
        if self.r < 1:
            raise ValueError(f"SparQConfig.r must be >= 1, got {self.r}")
        if self.k < 1:
            raise ValueError(f"SparQConfig.k must be >= 1, got {self.k}")
        if not 0 <= self.local_window <= self.k:
            raise ValueError(f"SparQConfig.local_window must be in [0, k={self.k}], got {self.local_window}")
        for name in ("k_fraction", "local_fraction"):
            value = _check_number("SparQConfig", name, getattr(self, name))
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"SparQConfig.{name} must be in [0, 1], got {getattr(self, name)}")
            object.__setattr__(self, name, value)  # a plain float (numpy or Fraction inputs too)
        if self.head_dim is not None:
            if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int):
                raise TypeError(f"SparQConfig.head_dim must be an int or None, got {type(self.head_dim).__name__}")
            if self.head_dim < 1:
                raise ValueError(f"SparQConfig.head_dim must be >= 1, got {self.head_dim}")

    def check_head_dim(self, head_dim: int, where: str = "this model") -> None:
        """ValueError if the config was sized for another head size (see ``head_dim``)."""
        if self.head_dim is not None and self.head_dim != head_dim:
            raise ValueError(
                f"this SparQConfig was made for head_dim {self.head_dim} (r = {self.r} is a share of it) but "
                f"{where} has head_dim {head_dim}: build it with SparQConfig.from_compression(..., "
                f"head_dim={head_dim})")

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
        r: int | None = None,
        min_k: int = 64,
        local_fraction: float = 0.25,
        reallocate: bool = False,
    ) -> "SparQConfig":
        """Settings that read about ``1/compression`` of dense attention's data: the one rule for
        "SparQ at 1/N" (``sparq generate --compression N``, ``sparq eval --budgets 1/N`` and
        ``build_method("sparq", 1/N, d)`` all call it).

        The paper's accounting, per KV head and decode step, in elements: dense attention
        reads K and V, ``2 * S * d``; SparQ reads ``r`` columns of K (``S * r``) in step 1
        and ``k`` full rows of K and V (``2 * k * d``) in step 2. Splitting the budget evenly,
        ``r = d / c`` and ``k = S / (2c)`` give ``(S*d/c + S*d/c) / (2*S*d) = 1/c``.
        With an explicit ``r``, k takes what is left: ``k = S * (1/c - r/(2d))`` (at least ``min_k``).
        k grows with the sequence length (``k_fraction``), with ``min_k`` as a floor so short
        contexts keep enough positions; a quarter of k is a local window, as in the paper.
        ``compression = 1`` keeps every position: exactly dense attention.
        Reallocation is off by default: in our evaluation (docs/EVAL.md) it was as good or better
        off, on both models (the authors also turned it off for Llama 3 and Mistral).
        """
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if (isinstance(compression, bool) or not isinstance(compression, (int, float))
                or not math.isfinite(compression) or not compression >= 1):
            raise ValueError(f"compression must be a finite number >= 1 (8 reads 1/8 of dense data), "
                             f"got {compression!r}")
        if isinstance(min_k, bool) or not isinstance(min_k, int) or min_k < 1:
            raise ValueError(f"min_k must be an int >= 1, got {min_k!r}")
        if isinstance(local_fraction, bool) or not isinstance(local_fraction, (int, float)) \
                or not 0.0 <= local_fraction <= 1.0:
            raise ValueError(f"local_fraction must be a number in [0, 1], got {local_fraction!r}")
        if not isinstance(reallocate, bool):
            raise TypeError(f"reallocate must be a bool, got {type(reallocate).__name__}")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"r must be an int >= 1 (or None for head_dim / compression), got {r!r}")
        budget = 1.0 / compression
        if compression == 1:  # the whole budget: every position kept, exactly dense attention
            r, k_fraction = head_dim, 1.0
        elif r is None:  # the paper's even split
            r, k_fraction = max(1, round(head_dim / compression)), budget / 2.0
        else:  # k takes what r leaves
            k_fraction = min(1.0, max(0.0, budget - min(r, head_dim) / (2.0 * head_dim)))
        return cls(
            r=r,
            k=min_k,
            local_window=0,
            reallocate=reallocate,
            k_fraction=k_fraction,
            local_fraction=float(local_fraction),
            head_dim=head_dim,
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
