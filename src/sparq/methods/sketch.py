"""SparQ with a low-bit key sketch as the step-1 scorer ("sparq-sketch").

Step 1 of the paper reads r fp16 columns of K chosen by |q|. Here step 1 reads all d
dimensions of a low-bit copy of K instead: keys are quantised per channel, with one
(min, max) pair per channel for every block of ``block`` consecutive tokens, built causally as
blocks fill: a finished block's codes never change, and the unfinished newest block is coded
(clamped) with the previous block's range, so every position is read at ``bits`` bits.
The approximate scores are ``softmax(q . K_sketch^T * scale)`` over the valid positions; steps 2
and 3 (top-k with a local window, exact attention over the kept rows, mean-value
reallocation) are the paper's, from `sparq.reference`.

Data per KV head and step, in 16-bit elements:
``S * d * bits / 16`` (the codes) ``+ 2 * d * n_blocks`` (the finished blocks' min/max)
``+ 2 * k * d`` (the kept rows); a sequence shorter than one block reads its keys exact (``S * d``).
k takes whatever the target fraction leaves after the sketch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import reference
from ._common import NEG_INF, grouped, lengths_of, ranks, rows_for
from . import _check
from .base import DecodeInputs, DecodeMethod


def quant_step(lo: Tensor, hi: Tensor, levels: int) -> Tensor:
    """(hi - lo) / levels in fp32 with an IEEE division on every device.

    On CUDA, PyTorch divides a tensor by a Python scalar as a multiplication by the scalar's
    reciprocal, which can differ from the quotient in the last bit; a key on a code's rounding
    boundary then gets another code than the CPU and the kernels (`tl.math.div_rn`) give it.
    Dividing by a tensor is a true division everywhere (the GPU fuzz found codes differing between
    the PyTorch prefill and the append kernel in 1-13 of 2048 code words per layer)."""
    diff = hi - lo
    return diff / torch.full_like(diff, float(levels))


def key_sketch(key: Tensor, valid: Tensor, bits: int, block: int) -> Tensor:
    """The keys as step 1 sees them [B, Hkv, S, d] (fp32), padding rows zero.

    Valid positions are cut into blocks of `block` tokens, counted from the first real token (so
    padding never moves a block boundary). A finished block is quantised with its own per-channel
    (min, max); the unfinished newest block is quantised, clamped, with the previous finished
    block's range, so no code is ever rewritten and nothing exact is read. Only a sequence
    shorter than one block (no finished block yet) is scored from its exact keys.
    """
    b, hkv, s, d = key.shape
    rank, _ = ranks(valid)
    n_valid = valid.sum(-1)  # [B]
    n_full = n_valid // block  # finished blocks per sequence
    blk = torch.where(valid, rank // block, torch.zeros_like(rank))
    in_full = valid & (blk < n_full[:, None])
    k = key.float()
    if not bool(in_full.any()):
        return k.masked_fill(~valid[:, None, :, None], 0.0)
    n_blocks = max(1, int(n_full.max()))
    big = torch.finfo(torch.float32).max
    idx4 = torch.where(in_full, blk, torch.zeros_like(blk))[:, None, :, None].expand(b, hkv, s, d)
    lo = torch.full((b, hkv, n_blocks, d), big, device=key.device).scatter_reduce(
        2, idx4, k.masked_fill(~in_full[:, None, :, None], big), reduce="amin")
    hi = torch.full((b, hkv, n_blocks, d), -big, device=key.device).scatter_reduce(
        2, idx4, k.masked_fill(~in_full[:, None, :, None], -big), reduce="amax")
    # The range each position is coded with: its own block's, or the last finished block's.
    src = torch.minimum(blk, (n_full - 1).clamp_min(0)[:, None])
    src4 = src[:, None, :, None].expand(b, hkv, s, d)
    lo_p, hi_p = lo.gather(2, src4), hi.gather(2, src4)
    levels = 2**bits - 1
    step = quant_step(lo_p, hi_p, levels)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((k - lo_p) / safe).round().clamp(0, levels)
    deq = torch.where(step > 0, lo_p + codes * step, lo_p)
    coded = valid & (n_full > 0)[:, None]
    out = torch.where(coded[:, None, :, None], deq, k)
    return out.masked_fill(~valid[:, None, :, None], 0.0)


def kept_sketch(x: DecodeInputs) -> Tensor:
    """`key_sketch(x.key, x.valid, bits, block)` from the cache's kept sketch (`x.sketch`, a
    `kernels.sketch_state.SketchState` over the valid runs `x.starts`, `x.lengths`) instead of from
    every key: [B, Hkv, S, d] fp32 in buffer order, the same values on the valid positions (others are
    finite but unspecified: the scorer masks them). Rows with no finished block read their exact
    keys, as in `key_sketch`. O(S * d) elementwise work, no min/max or re-quantisation of the whole
    sequence."""
    b, _, s, _ = x.key.shape
    deq = x.sketch.dequantised(x.lengths, upto=s, zero_invalid=False)  # [B, Hkv, S, d], logical order
    if x.starts is not None:  # left padding: logical position p of row i is buffer position starts[i] + p
        out = torch.zeros_like(deq)
        for i, (s0, n) in enumerate(zip(x.starts.tolist(), x.lengths.tolist())):
            out[i, :, s0:s0 + n] = deq[i, :, :n]
        deq = out
    exact = (x.lengths // x.sketch.block == 0)[:, None] & x.valid  # [B, S]: no finished block yet
    if bool(exact.any()):
        deq = torch.where(exact[:, None, :, None], x.key.float(), deq)
    return deq


@dataclass(frozen=True)
class SparQSketch(DecodeMethod):
    """fraction: target share of dense data; bits: sketch bits per key element (1, 2, 4 or 8);
    block: tokens per quantisation block (the newest, unfinished one is coded with the range
    of the block before it); local_fraction: share of k that is the local window;
    reallocate: the paper's step 3."""

    fraction: float
    bits: int = 2
    block: int = 128
    local_fraction: float = 0.25
    reallocate: bool = True
    min_k: int = 16
    name = "sparq-sketch"
    # on the kernels (a cache-kept sketch, CUDA fp16/bf16): fixed launch shapes, no host sync
    graph_safe = True

    @property
    def sketch_spec(self) -> tuple[int, int]:  # type: ignore[override]
        """What the caches keep for this method: the packed sketch's (bits, block)."""
        return (self.bits, self.block)

    def __post_init__(self) -> None:
        o = "SparQSketch"
        _check.fraction(o, self.fraction)
        _check.integer(o, "bits", self.bits, 1, 8)
        _check.integer(o, "block", self.block, 1)
        _check.number(o, "local_fraction", self.local_fraction, 0.0, 1.0)
        if not isinstance(self.reallocate, bool):
            raise TypeError(f"SparQSketch reallocate must be a bool, got {self.reallocate!r}")
        _check.integer(o, "min_k", self.min_k, 1)

    def sketch_elements(self, length: int, head_dim: int) -> float:
        n_full = length // self.block
        if n_full == 0:  # shorter than one block: scored from the exact keys
            return float(length * head_dim)
        return length * head_dim * self.bits / 16 + 2 * head_dim * n_full

    def k_for(self, length: int, head_dim: int) -> int:
        return rows_for(self.fraction, length, head_dim, overhead=self.sketch_elements(length, head_dim),
                        min_k=self.min_k)

    def local_for(self, k: int) -> int:
        return min(k, round(self.local_fraction * k))

    def _kept(self, x: DecodeInputs) -> bool:
        """The cache hands over this method's sketch, kept incrementally (and the valid runs)."""
        return (x.sketch is not None and x.lengths is not None
                and (x.sketch.bits, x.sketch.block) == self.sketch_spec)

    def approx_scores(self, x: DecodeInputs) -> Tensor:
        """s_hat [B, Hkv, g, S] from the sketch: the cache's kept one where it hands one over (the
        same values as `key_sketch`, bit for bit: `kept_sketch`), else built from all the keys."""
        ks = kept_sketch(x) if self._kept(x) else key_sketch(x.key, x.valid, self.bits, self.block)
        q = grouped(x.query, x.key.shape[1])
        logits = (q @ ks.transpose(-1, -2)) * x.scale
        return logits.masked_fill(~x.valid[:, None, None, :], NEG_INF).softmax(-1)

    def attend(self, x: DecodeInputs) -> Tensor:
        if self._kept(x) and x.sketch.kernels:
            # the kernels, reading the cache's packed sketch (kept incrementally: no per-step rebuild)
            from ..kernels.dispatch import sparq_decode
            from ..kernels.sketch_scores import SketchConfig

            return sparq_decode(x.query.contiguous(), x.key, x.value, SketchConfig.from_method(self, x.key.shape[-1]),
                                x.lengths, scale=x.scale, value_sum=x.value_sum, starts=x.starts, plans=x.plans,
                                sketch=x.sketch)
        d = x.key.shape[-1]
        lengths = lengths_of(x.valid)
        ks = [self.k_for(n, d) for n in lengths]
        k = torch.tensor(ks, device=x.valid.device)
        local = torch.tensor([self.local_for(v) for v in ks], device=x.valid.device)
        keep_all = k >= torch.tensor(lengths, device=x.valid.device)
        s_hat = self.approx_scores(x)
        keep = reference.select_topk(s_hat.sum(2), x.valid, k, local)
        y = reference.gather_attention(x.query, x.key, x.value, keep, x.scale)
        if self.reallocate:
            v_mean = reference.mean_value(x.value, x.valid, x.value_sum)
            y = reference.reallocate(y, s_hat, keep, v_mean, keep_all)
        b, hq, _ = x.query.shape
        return y.reshape(b, hq, d).to(x.query.dtype)

    def data_fraction(self, length: int, head_dim: int) -> float:
        k = self.k_for(length, head_dim)
        if k >= length:
            return 1.0
        return (self.sketch_elements(length, head_dim) + 2 * k * head_dim) / (2 * length * head_dim)

    @property
    def label(self) -> str:
        extra = "" if self.reallocate else ", no realloc"
        return f"sparq-sketch(f={self.fraction:g}, {self.bits}b, local={self.local_fraction:g}{extra})"


def default_bits(fraction: float) -> int:
    """About half the budget to the sketch, as the paper splits r against k: bits = 16 * fraction,
    rounded down to 1, 2, 4 or 8 (so 1/8 -> 2 bits, 1/16 -> 1 bit)."""
    target = 16 * fraction
    best = 1
    for b in (1, 2, 4, 8):
        if b <= target + 1e-9:
            best = b
    return best


