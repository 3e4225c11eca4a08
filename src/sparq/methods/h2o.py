"""H2O (Zhang et al. 2023): heavy hitters + a recent window, with permanent eviction.

Every position accumulates the attention probability it receives (summed over the query heads
that share its KV head), over the prefill and then over every decode step. At each decode step
the cache keeps at most k positions per KV head: the most recent ``recent`` positions plus the
``k - recent`` kept positions with the largest accumulated score; anything dropped is never
read again (state["h2o"]["kept"] only loses positions, except the newest token, which enters).

Data per KV head and step: the kept rows, ``2 * k * d``, plus reading the k accumulated
scores that decide the next eviction (``k`` elements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import NEG_INF, grouped, lengths_of, ranks, rows_for
from . import _check
from .base import DecodeInputs, DecodeMethod

PREFILL_KEY = "h2o_prefill_scores"  # [B, Hkv, S] accumulated over the prefill, shared by budgets


def prefill_scores(query: Tensor, key: Tensor, valid: Tensor, scale: float, chunk: int = 256) -> Tensor:
    """Column sums of the causal prefill attention, [B, Hkv, S] (fp32), padding rows ignored.

    query [B, Hq, L, d] are the last L positions of key [B, Hkv, S, d]. Exact; each chunk of
    queries only looks at the keys it can see (causal) and skips the batch's common padding.
    """
    b, hq, q_len, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hkv, s, dtype=torch.float32, device=key.device)
    first = int(valid.float().argmax(-1).min()) if bool(valid.any()) else s  # common left padding
    offset = s - q_len
    k_all = key.float()
    pos_k = torch.arange(s, device=key.device)
    for start in range(max(0, first - offset), q_len, chunk):
        stop = min(q_len, start + chunk)
        hi = offset + stop  # keys visible to this chunk: [first, hi)
        lo = first
        q = query[:, :, start:stop].float().reshape(b, hkv, g, stop - start, d)
        k = k_all[:, :, lo:hi]
        logits = (q @ k[:, :, None].transpose(-1, -2)).mul_(scale)  # [B, Hkv, g, c, hi-lo]
        pos_q = torch.arange(offset + start, offset + stop, device=key.device)
        blocked = (pos_k[None, lo:hi] > pos_q[:, None])[None] | ~valid[:, None, lo:hi]  # [B, c, S']
        logits.masked_fill_(blocked[:, None, None], NEG_INF)
        probs = logits.softmax(-1).nan_to_num_(0.0)
        row_ok = valid[:, offset + start: offset + stop].float()  # padding queries count 0
        out[:, :, lo:hi] += torch.einsum("bhgcs,bc->bhs", probs, row_ok)
    return out


@dataclass(frozen=True)
class H2O(DecodeMethod):
    """fraction: target share of dense data; recent_fraction: share of k that is the recent window."""

    fraction: float
    recent_fraction: float = 0.5
    min_k: int = 16
    name = "h2o"

    def __post_init__(self) -> None:
        _check.fraction("H2O", self.fraction)
        _check.number("H2O", "recent_fraction", self.recent_fraction, 0.0, 1.0)
        _check.integer("H2O", "min_k", self.min_k, 1)

    def k_for(self, length: int, head_dim: int) -> int:
        return rows_for(self.fraction, length, head_dim, per_row=2 * head_dim + 1, min_k=self.min_k)

    def observe_prefill(self, query: Tensor, key: Tensor, value: Tensor, valid: Tensor, scale: float,
                        state: dict[str, Any]) -> None:
        # Called once per prefill chunk (the fast loop's prefill runs in chunks; the Hugging Face
        # path's prefill is one chunk): the chunks' column sums add up to the whole prefill's.
        scores = prefill_scores(query, key, valid, scale)
        prev = state.get(PREFILL_KEY)
        if prev is not None and prev.shape[0] == scores.shape[0] and prev.shape[-1] <= scores.shape[-1]:
            scores[..., : prev.shape[-1]] += prev
        state[PREFILL_KEY] = scores

    def _state(self, x: DecodeInputs) -> dict[str, Tensor]:
        b, hkv, s, _ = x.key.shape
        st = x.state.get("h2o")
        if st is not None and st["kept"].shape[-1] == s - 1 and st["kept"].shape[0] == b:
            new = x.valid[:, None, -1:].expand(b, hkv, 1)
            st["kept"] = torch.cat([st["kept"], new], dim=-1)
            st["acc"] = torch.cat([st["acc"], st["acc"].new_zeros(b, hkv, 1)], dim=-1)
        elif st is None or st["kept"].shape[-1] != s or st["kept"].shape[0] != b:
            acc = torch.zeros(b, hkv, s, dtype=torch.float32, device=x.key.device)
            pre = x.state.get(PREFILL_KEY)
            if pre is not None and pre.shape[0] == b and pre.shape[-1] <= s:
                acc[..., : pre.shape[-1]] = pre
            st = {"kept": x.valid[:, None, :].expand(b, hkv, s).clone(), "acc": acc}
            x.state["h2o"] = st
        return st

    def attend(self, x: DecodeInputs) -> Tensor:
        d = x.key.shape[-1]
        st = self._state(x)
        _, from_end = ranks(x.valid)
        # The newest token always enters. A growing cache has added it in _state already; a static
        # cache (the fast loop: same length every step, the token at position lengths[b] - 1) adds it here.
        newest = (from_end == 1) & x.valid
        kept = (st["kept"] | newest[:, None, :]) & x.valid[:, None, :]
        lengths = lengths_of(x.valid)
        ks = torch.tensor([self.k_for(n, d) for n in lengths], device=x.valid.device)
        recent = torch.tensor([min(int(k), round(self.recent_fraction * int(k))) for k in ks.tolist()],
                              device=x.valid.device)
        is_recent = (from_end <= recent[:, None])[:, None, :] & kept
        over = kept.sum(-1) > ks[:, None]  # [B, Hkv]: only then is anything evicted
        n_heavy = (ks[:, None] - is_recent.sum(-1)).clamp_min(0)  # [B, Hkv]
        heavy = _topk_rows(st["acc"], kept & ~is_recent, n_heavy)
        kept = torch.where(over[..., None], is_recent | heavy, kept)
        st["kept"] = kept  # permanent: what is dropped here is never restored
        q = grouped(x.query, x.key.shape[1])
        logits = (q @ x.key.float().transpose(-1, -2)) * x.scale
        probs = logits.masked_fill(~kept[:, :, None, :], NEG_INF).softmax(-1)  # [B, Hkv, g, S]
        st["acc"] = st["acc"] + probs.sum(2)
        y = probs @ x.value.float().masked_fill(~kept[..., None], 0.0)  # padding never leaks
        b, hq, _ = x.query.shape
        return y.reshape(b, hq, d).to(x.query.dtype)

    def data_fraction(self, length: int, head_dim: int) -> float:
        k = self.k_for(length, head_dim)
        return 1.0 if k >= length else (2 * k * head_dim + k) / (2 * length * head_dim)

    @property
    def label(self) -> str:
        return f"h2o(f={self.fraction:g}, recent={self.recent_fraction:g})"


def _topk_rows(scores: Tensor, allowed: Tensor, n: Tensor) -> Tensor:
    """topk_mask with a per-(batch, head) count n [B, H]."""
    out = torch.zeros_like(allowed)
    max_n = int(n.max()) if n.numel() else 0
    if max_n <= 0:
        return out
    max_n = min(max_n, scores.shape[-1])
    # stable: ties (e.g. equal scores) go to the older position, whatever the padding
    idx = scores.masked_fill(~allowed, NEG_INF).sort(dim=-1, descending=True, stable=True).indices[..., :max_n]
    ok = (torch.arange(max_n, device=scores.device) < n[..., None]) & allowed.gather(-1, idx)
    out.scatter_(-1, idx, ok)
    return out
