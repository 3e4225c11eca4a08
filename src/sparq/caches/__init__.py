"""The decode caches and what they derive from K and V.

- state.py    DerivedState: Kᵀ, the fp32 V sum and the valid runs, one implementation for both caches
- dynamic.py  SparQCache: transformers' DynamicCache plus that state per layer (`sparq.enable`)
- static.py   KernelCacheLayer: a preallocated static cache in the kernels' layout (the fast loop)
"""
