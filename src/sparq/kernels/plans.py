"""Who owns the kernels' launch plans: the KV cache, through a `PlanCache` (no triton import here,
so caches can hold one on machines without triton; plans are made on first use)."""

from __future__ import annotations


class PlanCache:
    """The launch plans of one KV cache, freed with it (FlashInfer's caller-owned workspace).

    One plan per (batch, heads, head_dim, config, device, dtype), shared by every layer.
    `growth=False`: a static cache, planned for exactly its capacity. Otherwise (a cache that
    grows by a position per step) the plan's capacity is the length rounded up to a power of two
    (at least `min_capacity`) and replaced by a doubled one when outgrown, so a generate call makes
    O(log S) plans, holds one, and the workspace never exceeds twice what the length needs.
    """

    def __init__(self, tuning=None, *, growth: bool = True, min_capacity: int = 1024) -> None:
        self.tuning = tuning  # a dispatch.Tuning; None = DEFAULT_TUNING
        self.growth = growth
        self.min_capacity = min_capacity
        self._plans: dict = {}
        self.created = 0  # plans made over this cache's life (tests watch it)

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def get(self, query, key, config):
        batch, hq, d = query.shape
        seq_len = key.shape[2]
        ident = (batch, hq, key.shape[1], d, config, query.device, query.dtype)
        plan = self._plans.get(ident)
        if plan is not None and seq_len <= plan.capacity:
            return plan
        if not self.growth:
            capacity = seq_len
        else:
            capacity = max(self.min_capacity, 1 << (seq_len - 1).bit_length())
        from .dispatch import DEFAULT_TUNING, DecodePlan  # triton is imported only once a plan is needed

        plan = DecodePlan(batch, hq, key.shape[1], d, capacity, config, query.device, query.dtype,
                          self.tuning or DEFAULT_TUNING)
        self._plans[ident] = plan  # replaces (frees) an outgrown plan of the same identity
        self.created += 1
        return plan
