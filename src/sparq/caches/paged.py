"""The key sketch of the default method kept beside transformers' paged KV cache (continuous batching).

What `methods.sketch.key_sketch` computes from a request's keys, stored per physical page instead of
recomputed per step (written in PyTorch):
  * codes  [slots, Hkv, ...]: every position of a finished sketch block, quantised per channel with
    that block's own range, `bits` bits per element: int32 words [slots, Hkv, d * bits / 32] in the
    kernels' `code_layout` order where it exists (head_dim a multiple of 16 and of 32 / bits, so a
    decode step hands them to the Triton scorer by a gather: `step_state`), else uint8
    [slots, Hkv, d * bits / 8] packed along d (PyTorch scorer only);
  * lo, hi key dtype [slots // block + 1, Hkv, d]: each finished block's per-channel min and max
    (exact in the key dtype), at index (physical slot of the block's first position) // block.
A sketch block is `block` consecutive positions of a request, counted from its first token; it is
written once, in the step whose keys finish it, and read by later steps through the request's pages.
The request's newest, unfinished block is never stored: it is coded at read time with the last
finished block's range (its keys are read anyway), so a freed page reused by another request is
never read before its new owner finishes the block and rewrites it.
Indexing by physical page is what makes requests come and go for free: a finished block shared by
prefix sharing is shared with its sketch (a request that reuses blocks never rewrites them, and
their keys are the same physical keys); a request's pages are freed by transformers and their sketch
is overwritten by their next owner. Every block id also has a `known` flag, cleared whenever keys
are written into it by a step that does not keep the sketch (another method on the same cache) and
set when its sketch is written, so such a block is never read from a stale sketch; once that has
happened (or the sketch was made after keys existed) the sketch is `tainted` and readers check the
flags (a host sync per layer); a sketch that saw every write skips the check. Needs: each sketch block
contiguous in the slot space and starting at a multiple of `block` (the cache's block size a
multiple of the sketch block; checked as blocks finish) and no copies of
finished blocks -- transformers copies whole finished blocks only when forking with block sharing
off, so the caller keeps the sketch only while `allow_block_sharing` is on.
Memory per position and KV head: d * bits / 8 bytes of codes + 4 * d / block bytes of ranges (2-bit,
d = 128, block 128: 36 B, +7% of fp16 K and V), allocated on first use for all of the cache's slots
where their number is known (transformers' memory planner does not count it; `sparq bench serve`
takes it out of the same budget).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods.sketch import quant_step


class PagedSketch:
    """One layer's sketch over the paged cache's slots (see the module docstring).

    slots: the cache's number of physical slots, when known: storage for all of them is made at once
    (the sketch's share of the memory budget, as `sparq bench serve` counts it), so no step grows it
    and `invalidate` / `write_blocks` need no host read of the slot indices. None: grown as slots
    appear (doubling; one host sync per growth check).
    `tainted`: some keys were written here without their sketch (another method on the cache, or
    this sketch was made after keys existed), so a finished block may be unknown and readers check
    `known` (one host sync per layer). Untainted, every finished block's sketch was written when it
    finished, and the check is skipped."""

    def __init__(self, num_kv_heads: int, head_dim: int, bits: int, block: int, dtype: torch.dtype,
                 device: torch.device, slots: int | None = None, *, tainted: bool = True) -> None:
        if bits not in (1, 2, 4, 8) or head_dim * bits % 8:
            raise ValueError(f"a paged sketch needs bits in (1, 2, 4, 8) and head_dim * bits a multiple of 8, got "
                             f"bits={bits}, head_dim={head_dim}")
        self.hkv, self.d, self.bits, self.block = num_kv_heads, head_dim, bits, block
        self.dtype, self.device = dtype, torch.device(device)
        self.per_byte = 8 // bits
        # codes as the kernels' scorer reads them (`kernels.sketch_state.code_layout`: int32 words, dims
        # interleaved) wherever that layout exists, so a step hands them over by a plain gather; else bytes
        self.words = self.word_layout(head_dim, bits)
        if self.words:
            from ..kernels.sketch_state import code_layout

            self._word, self._bit = code_layout(head_dim, bits, self.device)
            self.codes = torch.zeros(0, num_kv_heads, head_dim * bits // 32, dtype=torch.int32, device=device)
        else:
            self.codes = torch.zeros(0, num_kv_heads, head_dim // self.per_byte, dtype=torch.uint8, device=device)
        self.lo = torch.zeros(0, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.hi = torch.zeros_like(self.lo)
        self.known = torch.zeros(0, dtype=torch.bool, device=device)  # per block id: see the module docstring
        self.written = 0  # finished blocks written over this sketch's life (tests watch it)
        self.tainted = bool(tainted)
        self.fixed = slots is not None
        if slots is not None:
            if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
                raise ValueError(f"slots must be a positive int (the cache's physical slots) or None, got {slots!r}")
            self._grow(slots)

    @staticmethod
    def word_layout(head_dim: int, bits: int) -> bool:
        """Whether the codes of this head_dim and bits are kept in the kernels' word layout (`words`)."""
        return head_dim % 16 == 0 and head_dim * bits % 32 == 0

    def reserve(self, slots: int) -> None:
        """Room for slot indices < slots (capacity doubles: O(1) amortised). A fixed-size sketch never
        grows: its slots are the cache's."""
        if slots <= self.codes.shape[0]:
            return
        if self.fixed:
            raise ValueError(f"slot {slots - 1} is outside this sketch's {self.codes.shape[0]} slots (the cache's)")
        self._grow(max(slots, 2 * self.codes.shape[0]))

    def _grow(self, n: int) -> None:
        codes = self.codes.new_zeros(n, *self.codes.shape[1:])
        codes[: self.codes.shape[0]] = self.codes
        nb = n // self.block + 1
        lo, hi = self.lo.new_zeros(nb, self.hkv, self.d), self.hi.new_zeros(nb, self.hkv, self.d)
        lo[: self.lo.shape[0]], hi[: self.hi.shape[0]] = self.lo, self.hi
        known = self.known.new_zeros(nb)
        known[: self.known.shape[0]] = self.known
        self.codes, self.lo, self.hi, self.known = codes, lo, hi, known

    def invalidate(self, slots: Tensor) -> None:
        """Keys were written at these slots by a step that does not keep the sketch (another method on
        the cache): their blocks' sketch is unknown until rewritten, and readers must check `known`
        from now on (`tainted`). A step that keeps the sketch need not call this: it writes keys only
        into blocks it finishes (and sketches) or leaves unfinished. Needs blocks aligned in the slot
        space (the caller checks)."""
        self.tainted = True
        ids = slots // self.block
        if self.fixed:  # every slot of the cache has a block id here: no bounds check, no host sync
            self.known[ids.clamp(max=self.known.shape[0] - 1)] = False
        else:
            ids = ids[ids < self.known.shape[0]]
            self.known[ids] = False

    def _code(self, k: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """`key_sketch`'s codes of k (fp32) with ranges lo, hi (broadcast): float codes in [0, levels]."""
        levels = 2**self.bits - 1
        step = quant_step(lo, hi, levels)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        return ((k - lo) / safe).round().clamp(0, levels)

    def _deq(self, codes: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        step = quant_step(lo, hi, 2**self.bits - 1)
        return torch.where(step > 0, lo + codes * step, lo)

    def _pack(self, codes: Tensor) -> Tensor:
        """[..., d] float codes -> int32 words [..., d * bits / 32] in `code_layout` order (`self.words`),
        else [..., d / per_byte] uint8 (element j in byte j // per_byte)."""
        if self.words:
            from ..kernels.sketch_state import pack_codes

            return pack_codes(codes.long(), self.bits)
        c = codes.to(torch.uint8).reshape(*codes.shape[:-1], self.d // self.per_byte, self.per_byte)
        shifts = torch.arange(self.per_byte, device=c.device, dtype=torch.uint8) * self.bits
        return (c << shifts).sum(-1, dtype=torch.uint8)

    def _unpack(self, packed: Tensor) -> Tensor:
        if self.words:
            return ((packed[..., self._word] >> self._bit.to(torch.int32)) & (2**self.bits - 1)).float()
        shifts = torch.arange(self.per_byte, device=packed.device, dtype=torch.uint8) * self.bits
        c = (packed[..., None] >> shifts) & (2**self.bits - 1)
        return c.reshape(*packed.shape[:-1], self.d).float()

    def write_blocks(self, keys: Tensor, slots: Tensor) -> None:
        """Finished blocks: keys [n, block, Hkv, d], slots [n, block] (their physical slots, contiguous
        per block). Stores each block's range and its codes with that range."""
        if keys.shape[0] == 0:
            return
        if not self.fixed:
            self.reserve(int(slots.max()) + 1)
        k = keys.float()
        lo, hi = k.amin(1), k.amax(1)  # [n, Hkv, d], exact in the key dtype
        codes = self._code(k, lo[:, None].to(self.dtype).float(), hi[:, None].to(self.dtype).float())
        self.codes[slots.reshape(-1)] = self._pack(codes).reshape(-1, self.hkv, self.codes.shape[-1])
        ids = slots[:, 0] // self.block
        self.lo[ids], self.hi[ids] = lo.to(self.dtype), hi.to(self.dtype)
        self.known[ids] = True
        self.written += keys.shape[0]

    def dequantised(self, key: Tensor, slots: Tensor, lengths: Tensor) -> Tensor | None:
        """The keys as step 1 sees them, [b, Hkv, S, d] fp32, for rows whose keys are key [b, Hkv, S, d]
        (logical order, valid = a prefix of lengths[b]) at physical slots [b, S]: finished blocks from
        the stored codes and ranges, the unfinished block coded now with the last finished block's
        range. Positions past a row's length, and rows with no finished block, are finite but
        unspecified (the scorer masks the first and reads exact keys for the second). None when a
        finished block's sketch is unknown (its keys were written by a step that did not keep the
        sketch, e.g. under another method): the caller derives the sketch from the keys instead."""
        b, _, s, _ = key.shape
        blk = self.block
        if self.codes.shape[0] == 0:  # nothing finished yet: room to index (the values are never used)
            self.reserve(blk)
        pos = torch.arange(s, device=key.device)
        n_full = lengths.long() // blk  # [b]
        last = (n_full - 1).clamp_min(0)  # the last finished block of each row
        # the range of every position: its own block's if finished, else the last finished block's
        src = torch.minimum(pos[None, :] // blk, last[:, None])  # [b, S] logical block
        first = slots.gather(1, (src * blk).clamp(max=s - 1))  # its first position's slot
        ids = (first // blk).clamp(max=self.lo.shape[0] - 1)
        lo = self.lo[ids].float().permute(0, 2, 1, 3)  # [b, Hkv, S, d]
        hi = self.hi[ids].float().permute(0, 2, 1, 3)
        finished2 = pos[None, :] < (n_full * blk)[:, None]  # [b, S]
        if self.tainted and bool((finished2 & ~self.known[ids]).any()):  # one host sync per chunk
            return None
        stored = self._unpack(self.codes[slots.clamp(max=self.codes.shape[0] - 1)]).permute(0, 2, 1, 3)
        finished = finished2[:, None, :, None]
        codes = torch.where(finished, stored, self._code(key.float(), lo, hi))
        return self._deq(codes, lo, hi)


TAIL_KERNEL = True  # False: step_state codes the unfinished block in PyTorch (the kernel's specification)


class StepBuffers:
    """Flat buffers reused by every layer and step for the decode requests' step sketch (`step_state`):
    grown by doubling, so a steady batch allocates nothing per step."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = 1
        for x in shape:
            n *= x
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
            size = max(n, 2 * buf.numel()) if buf is not None and buf.dtype == dtype else n
            buf = self._bufs[name] = torch.zeros(size, dtype=dtype, device=device)
        return buf[:n].view(shape)


def _step_index(key: Tensor, slots: Tensor, starts: Tensor, lengths: Tensor, max_length: int, capacity: int,
                block: int) -> dict[str, Tensor]:
    """`step_state`'s index tensors, the same for every layer of a forward pass (its slots and rows)."""
    dev, n_key = key.device, slots.shape[0]  # the packed positions
    starts, lengths = starts.long(), lengths.long()
    n_full = lengths // block
    j = torch.arange(max_length // block, device=dev)
    pos = torch.arange(max_length, device=dev)
    tp = (n_full * block)[:, None] + torch.arange(block, device=dev)[None, :]  # [b, blk] the unfinished block
    tail_key = (starts[:, None] + tp).clamp(max=n_key - 1)
    return {
        "n_full": n_full, "rows": torch.arange(starts.shape[0], device=dev),
        "first_slot": slots[(starts[:, None] + j[None, :] * block).clamp(max=n_key - 1)],  # [b, nb_max]
        "finished": j[None, :] < n_full[:, None],
        "slot": slots[(starts[:, None] + pos[None, :]).clamp(max=n_key - 1)],  # [b, max_length]
        "tail_key": tail_key, "tail_slot": slots[tail_key],  # its packed positions, their slots
        "tail_ok": (tp < lengths[:, None]) & (n_full > 0)[:, None],
        # clamped positions are >= every length: never ok, never clash with an ok one
        "tail_pos": tp.clamp(max=capacity - 1),
    }


def step_state(sk: PagedSketch, key: Tensor, slots: Tensor, starts: Tensor, lengths: Tensor, max_length: int,
               capacity: int, bufs: StepBuffers, index: dict | None = None, *, paged: bool = False):
    """The kept sketch of a batch of decode requests as the kernels' scorer reads it: a
    `kernels.sketch_state.SketchState` over reused buffers, row b = the request whose keys are
    key[starts[b] : starts[b] + lengths[b]] of the packed read (key [K, Hkv, d], at physical slots
    slots [K]), in logical position order. Finished blocks: their stored codes (a gather of
    d * bits / 8 bytes per position and KV head, no unpacking) and ranges; the unfinished newest
    block: coded now with the last finished block's range from its keys (< block positions per
    row); a row with no finished block gets nothing (the scorer reads its exact keys). So the
    scorer sees `methods.sketch.key_sketch` value for value, as `dequantised` does. capacity: the
    plan's (a multiple of the block, >= max_length). `index`: a dict kept for one forward pass,
    where the layer-independent index tensors are made once. None when a finished block's sketch
    is unknown (see `dequantised`) or the codes are not in the kernels' word layout.
    paged: key is the layer's whole paged cache [num_slots, Hkv, d] instead of the packed read: the
    unfinished block's keys are read at their physical slots (slots[packed position])."""
    from ..kernels import available
    from ..kernels.sketch_state import SketchState, code_tail, tail_codes_supported

    if not sk.words:
        return None
    b, blk, hkv, dev = starts.shape[0], sk.block, sk.hkv, key.device
    ident = (b, max_length, capacity, blk)
    if index is None or index.get("ident") != ident:
        fresh = _step_index(key, slots, starts, lengths, max_length, capacity, blk)
        fresh["ident"] = ident  # type: ignore[assignment]
        if index is None:
            index = fresh
        else:
            index.clear()
            index.update(fresh)
    nb = max(1, capacity // blk)
    codes = bufs.view("codes", (b, hkv, capacity, sk.codes.shape[-1]), torch.int32, dev)
    lo = bufs.view("lo", (b, hkv, nb, sk.d), sk.dtype, dev)
    hi = bufs.view("hi", (b, hkv, nb, sk.d), sk.dtype, dev)
    if sk.codes.shape[0] == 0:  # nothing finished yet: room to index (the values are never used)
        sk.reserve(blk)
    nb_max = max_length // blk
    if nb_max:  # the finished blocks' ranges, through the slot of each block's first position
        ids = (index["first_slot"] // blk).clamp(max=sk.lo.shape[0] - 1)
        # one host sync per layer, only where a finished block may be unknown (`PagedSketch.tainted`)
        if sk.tainted and bool((index["finished"] & ~sk.known[ids]).any()):
            return None
        lo[:, :, :nb_max] = sk.lo[ids].transpose(1, 2)
        hi[:, :, :nb_max] = sk.hi[ids].transpose(1, 2)
    # every position's stored codes (those of unfinished or invalid positions are overwritten or unread)
    codes[:, :, :max_length] = sk.codes[index["slot"].clamp(max=sk.codes.shape[0] - 1)].transpose(1, 2)
    # the unfinished newest block, coded with the last finished block's range: one Triton launch where
    # the kernels run (the PyTorch path below, its specification, launches ~26 kernels per layer)
    tail_rows = index["tail_slot" if paged else "tail_key"]
    if TAIL_KERNEL and tail_codes_supported(blk) and available(dev):
        code_tail(key, tail_rows, lengths, codes, lo, hi, sk.bits, blk)
        return SketchState.over(codes, lo, hi, bits=sk.bits, block=blk)
    rows, tpc = index["rows"], index["tail_pos"]
    x = key[tail_rows].float()  # [b, blk, Hkv, d]
    r = (index["n_full"] - 1).clamp(0, nb - 1)
    lo_r, hi_r = lo[rows, :, r].float()[:, None], hi[rows, :, r].float()[:, None]  # [b, 1, Hkv, d]
    words = sk._pack(sk._code(x, lo_r, hi_r))  # [b, blk, Hkv, W]
    old = codes[rows[:, None], :, tpc]
    codes[rows[:, None], :, tpc] = torch.where(index["tail_ok"][:, :, None, None], words, old)
    return SketchState.over(codes, lo, hi, bits=sk.bits, block=blk)


class _KeptSketch:
    """What `methods.sketch.kept_sketch` reads (`x.sketch`): the already dequantised keys of a chunk of
    decode requests. `kernels` is False: the PyTorch scorer runs."""

    kernels = False

    def __init__(self, deq: Tensor, bits: int, block: int) -> None:
        self.deq, self.bits, self.block = deq, bits, block

    def dequantised(self, lengths: Tensor, upto: int | None = None, *, zero_invalid: bool = True) -> Tensor:
        out = self.deq if upto is None else self.deq[:, :, :upto]
        if zero_invalid:
            valid = torch.arange(out.shape[2], device=out.device)[None, :] < lengths[:, None]
            out = out.masked_fill(~valid[:, None, :, None], 0.0)
        return out
