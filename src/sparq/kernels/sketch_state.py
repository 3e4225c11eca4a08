"""The packed key sketch of one layer, kept incrementally for the sketch scorer (`sketch_scores`).

The sketch is `methods/sketch.py`'s `key_sketch`, stored instead of recomputed: per KV head, every
valid position's key quantised per channel to `bits` bits (1 or 2) with the (min, max) of a block
of `block` consecutive valid positions, counted from the row's first valid token (left padding:
row b's valid positions are [starts[b], starts[b] + lengths[b]) of the K buffer; the sketch is
indexed by the LOGICAL position s = buffer position - starts[b]).
- a finished block (all `block` positions present) is coded with its own range, once, and never
  rewritten;
- the newest, unfinished block is coded (clamped) with the previous finished block's range;
- a row with no finished block yet (length < block) has no codes: the scorer reads its exact keys.
Code of x with range (lo, hi): step = (hi - lo) / (2^bits - 1) (fp32), c = clamp(round_half_even(
(x - lo) / step), 0, 2^bits - 1) (step 0: x - lo); the scorer dequantises lo + c * step (lo if step 0).

Layout (chosen for the scorer's unpack, see `code_layout`):
  codes  int32 [B, Hkv, capacity, W], W = d * bits / 32 words per position. One position's codes
         are W consecutive words (16 B at d = 128, 1 bit; 32 B at 2 bits), a tile of positions one
         contiguous run. Inside a position the dims are interleaved for the tensor cores' operand
         registers: dim j = 16 c + 4 t + 2 p + e (c: 16-dim chunk, t: 0..3, p, e: 0..1) is pair
         P = t * d / 8 + 2 c + p, stored in word P // (16 / bits) at bit (P % (16 / bits)) * bits
         + 16 e. So the two dims (e = 0, 1) of a pair sit in the two 16-bit halves of one word at
         the same offset (one LOP3 makes both fp16 values: the magic-number trick), and the pairs
         one MMA lane needs (fixed t) are whole words (d * bits >= 128) or a fixed slice of one.
  lo, hi key dtype [B, Hkv, capacity // block, d]: per finished block and channel. They are a min
         and a max of the keys, so the key dtype holds them exactly (bf16/fp16: 2 bytes each).
Bytes per position per KV head: d * bits / 8 (codes) + 4 * d / block (ranges, 16-bit keys):
d = 128, block = 128: 1 bit 16 + 4 = 20 B, 2 bits 32 + 4 = 36 B (the fp16 K and V rows: 512 B,
so +3.9% / +7.0% of the KV cache; the transposed fp16 copy of the paper's step 1 is +50%).

Operations: `prefill` builds everything from the K buffer (PyTorch, O(S), no host sync);
`append` codes one new position per row in place (one Triton launch per layer, no host sync):
the new position's codes with the last finished block's range, and when this position finishes
a block, that block's range from its exact keys (read from the K buffer) and its codes, once
(O(block * d), amortised O(d) per step).
"""

from __future__ import annotations

import torch

from ..methods.sketch import quant_step

try:  # the Triton append; without triton (a CPU install) only the PyTorch path exists
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

    def _jit(fn):  # the kernels below are then never launched (sketch_supported is False)
        return fn


@_jit
def _round_half_even(x):
    """torch.round (half to even) for x >= 0 in fp32, exact: x - floor(x) has no rounding."""
    f = tl.floor(x)
    frac = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), f + 1.0, f)


@_jit
def _encode(x, lo, hi, LEVELS: tl.constexpr):
    """Codes (int32) of x fp32 with the range lo, hi (fp32, x's shape), as key_sketch computes them
    (IEEE divisions: the same codes as the PyTorch prefill, bit for bit)."""
    step = tl.math.div_rn(hi - lo, tl.full(hi.shape, LEVELS, tl.float32))
    safe = tl.where(step > 0, step, 1.0)
    c = _round_half_even(tl.maximum(tl.math.div_rn(x - lo, safe), 0.0))
    return tl.minimum(c, LEVELS).to(tl.int32)


@_jit
def _pack(c, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """[N, D] int32 codes -> [N, D * BITS / 32] int32 words in `code_layout`'s order (disjoint
    bit fields: sum == or). One masked row sum per word (W of them) instead of a permute of the
    [N, D] tile: tl.permute + reshape of the 5-D tile compiled to a wrong order on sm_90 (triton
    3.6; the CPU interpreter was right), and this runs once per finished block or one row per step."""
    SLOTS: tl.constexpr = 16 // BITS
    W: tl.constexpr = D * BITS // 32
    j = tl.arange(0, D)
    pair = ((j % 16) // 4) * (D // 8) + 2 * (j // 16) + (j % 4) // 2
    word = pair // SLOTS
    shifted = c << ((pair % SLOTS) * BITS + 16 * (j % 2))[None, :]
    offs_w = tl.arange(0, W)
    words = tl.zeros([N, W], tl.int32)
    for w in tl.static_range(W):
        col = tl.sum(tl.where((word == w)[None, :], shifted, 0), axis=1)  # [N]
        words = tl.where((offs_w == w)[None, :], col[:, None], words)
    return words


_LAYOUTS: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def code_layout(head_dim: int, bits: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where dim j of a position's codes is stored: (word [d], bit [d]) int64 (module docstring):
    j = 16 c + 4 t + 2 p + e -> pair P = t * d / 8 + 2 c + p, word P // (16 / bits), bit
    (P % (16 / bits)) * bits + 16 e. Made once per (head_dim, bits, device) and shared (read only):
    the serving route packs codes in every layer of every step (H200: 8 ms of host time per
    32-layer pass when it was rebuilt per call)."""
    ident = (int(head_dim), int(bits), str(torch.device(device) if device is not None else torch.device("cpu")))
    if ident not in _LAYOUTS:
        j = torch.arange(head_dim, device=device)
        c, t, p, e = j // 16, (j % 16) // 4, (j % 4) // 2, j % 2
        pair = t * (head_dim // 8) + 2 * c + p
        slots = 16 // bits
        _LAYOUTS[ident] = (pair // slots, (pair % slots) * bits + 16 * e)
    return _LAYOUTS[ident]


@_jit
def _sketch_append_kernel(
    knew_ptr, key_ptr, codes_ptr, lo_ptr, hi_ptr, pos_ptr, starts_ptr,
    stride_nb, stride_nh, stride_kb, stride_kh, stride_ks,
    num_kv_heads, s_cap, n_blk_cap,
    D: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    """Codes the new position p = pos[b] (logical) of one (row, KV head).

    p does not finish a block: reads the new key (d * elt) and the last finished block's range
    (2 * d * elt), writes d * bits / 8 bytes of codes (nothing while the row has no finished block).
    p finishes block j: reads block j's exact keys from the K buffer (BLOCK * d * elt), writes its
    range (2 * d * elt) and its codes (BLOCK * d * bits / 8).
    """
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    p = tl.load(pos_ptr + b)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    W: tl.constexpr = D * BITS // 32
    offs_d = tl.arange(0, D)
    offs_w = tl.arange(0, W)
    n_full = p // BLOCK  # finished blocks before this position
    code_row = codes_ptr + bh.to(tl.int64) * s_cap * W
    rng = bh.to(tl.int64) * n_blk_cap * D
    if p >= s_cap:  # no room: nothing to code (the caller's cache is full)
        pass
    elif (p + 1) % BLOCK == 0:  # this position finishes block n_full: its range, then its codes
        first = 0
        if HAS_STARTS:
            first = tl.load(starts_ptr + b)
        offs_n = tl.arange(0, BLOCK)
        rows = (first + n_full * BLOCK + offs_n).to(tl.int64)
        x = tl.load(key_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                    + rows[:, None] * stride_ks + offs_d[None, :])
        lo = tl.min(x, axis=0)
        hi = tl.max(x, axis=0)
        tl.store(lo_ptr + rng + n_full * D + offs_d, lo)
        tl.store(hi_ptr + rng + n_full * D + offs_d, hi)
        xf = x.to(tl.float32)
        c = _encode(xf, tl.broadcast_to(lo.to(tl.float32)[None, :], xf.shape),
                    tl.broadcast_to(hi.to(tl.float32)[None, :], xf.shape), LEVELS)
        words = _pack(c, BLOCK, D, BITS)
        pos = (n_full * BLOCK + offs_n).to(tl.int64)
        tl.store(code_row + pos[:, None] * W + offs_w[None, :], words)
    elif n_full > 0:  # unfinished block: clamped codes with the last finished block's range
        x = tl.load(knew_ptr + b * stride_nb + h * stride_nh + offs_d).to(tl.float32)
        lo = tl.load(lo_ptr + rng + (n_full - 1) * D + offs_d).to(tl.float32)
        hi = tl.load(hi_ptr + rng + (n_full - 1) * D + offs_d).to(tl.float32)
        c = _encode(x, lo, hi, LEVELS)
        words = tl.reshape(_pack(tl.reshape(c, (1, D)), 1, D, BITS), (W,))
        tl.store(code_row + p.to(tl.int64) * W + offs_w, words)


@_jit
def _tail_codes_kernel(key_ptr, rows_ptr, len_ptr, codes_ptr, lo_ptr, hi_ptr,
                       stride_kr, stride_kh, num_kv_heads, cap, n_blk,
                       D: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The newest, unfinished block of row b coded with its last finished block's range, into a
    step's sketch (one program per row and KV head; `code_tail`). A row with no finished block is
    left alone. Reads up to BLOCK keys (d * elt each, at K rows rows[b, t], 8 B of row index each)
    and one range (2 * d * elt); writes d * bits / 8 bytes of codes per position below the length."""
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    length = tl.load(len_ptr + b)
    n_full = length // BLOCK
    if n_full > 0:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        W: tl.constexpr = D * BITS // 32
        offs_t = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        pos = n_full * BLOCK + offs_t
        ok = pos < length
        row = tl.load(rows_ptr + b.to(tl.int64) * BLOCK + offs_t, mask=ok, other=0).to(tl.int64)
        x = tl.load(key_ptr + row[:, None] * stride_kr + h.to(tl.int64) * stride_kh + offs_d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        rng = (bh.to(tl.int64) * n_blk + tl.minimum(n_full - 1, n_blk - 1)) * D
        lo = tl.load(lo_ptr + rng + offs_d).to(tl.float32)
        hi = tl.load(hi_ptr + rng + offs_d).to(tl.float32)
        c = _encode(x, tl.broadcast_to(lo[None, :], x.shape), tl.broadcast_to(hi[None, :], x.shape), LEVELS)
        words = _pack(c, BLOCK, D, BITS)
        dst = (bh.to(tl.int64) * cap + pos.to(tl.int64)) * W
        tl.store(codes_ptr + dst[:, None] + tl.arange(0, W)[None, :], words, mask=ok[:, None])


def tail_codes_supported(block: int) -> bool:
    """Whether `code_tail` takes this sketch block (a power of two: the kernel's position tile)."""
    return triton is not None and block >= 1 and not block & (block - 1)


def code_tail(key: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
              hi: torch.Tensor, bits: int, block: int) -> None:
    """One launch: for every row b with a finished block, the positions n_full * block .. length - 1
    (its unfinished block, n_full = lengths[b] // block) coded with the range of block
    min(n_full - 1, n_blocks - 1) into codes [B, Hkv, cap, W] (contiguous), exactly as
    `caches.paged.step_state`'s PyTorch path (the same `_encode` as the append kernel). key [N, Hkv, d]
    (head_dim contiguous); rows [B, block]: the K row of each such position (packed positions or
    physical slots; unread past the length); lo, hi [B, Hkv, n_blocks, d] contiguous."""
    b, hkv, cap, _ = codes.shape
    d = key.shape[-1]
    if key.stride(-1) != 1 or not (codes.is_contiguous() and lo.is_contiguous() and hi.is_contiguous()
                                   and rows.is_contiguous()):
        raise ValueError("code_tail needs head_dim-contiguous keys and contiguous codes, ranges and rows")
    _tail_codes_kernel[(b * hkv,)](
        key, rows, lengths, codes, lo, hi, key.stride(0), key.stride(1), hkv, cap, lo.shape[2],
        D=d, BITS=bits, BLOCK=block, num_warps=8 if block * d >= 16384 else 4,
    )


def sketch_storable(head_dim: int, bits: int, block: int) -> bool:
    """Can a `SketchState` hold this sketch at all (PyTorch prefill and append, `dequantised`): codes
    of 1, 2, 4 or 8 bits that fill whole 32-bit words per position (head_dim a multiple of 16:
    `code_layout` interleaves 16-dim chunks), blocks of any size."""
    return bits in (1, 2, 4, 8) and block >= 1 and head_dim % 16 == 0 and (head_dim * bits) % 32 == 0


def sketch_supported(head_dim: int, bits: int, block: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Can the sketch kernels keep and score this layer (else the method's PyTorch path runs, from a
    PyTorch-kept state where `sketch_storable`)?"""
    from . import SUPPORTED_HEAD_DIMS, available

    return (bits in (1, 2) and block >= 16 and not block & (block - 1) and head_dim in SUPPORTED_HEAD_DIMS
            and (head_dim * bits) % 32 == 0 and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and available(device) and (device.type != "cuda" or dtype != torch.float32)
            # the CPU interpreter (triton 3.9) returns garbage logits for bf16 keys (the H200 does not;
            # found by the sketch fuzz on the CPU): bf16 on the CPU takes the PyTorch path
            and (device.type == "cuda" or dtype != torch.bfloat16))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., d] (integers in [0, 2^bits)) -> int32 words [..., d * bits / 32] in `code_layout`'s
    order (the PyTorch twin of the Triton `_pack`)."""
    word, bit = code_layout(codes.shape[-1], bits, codes.device)
    shape = codes.shape[:-1] + (codes.shape[-1] * bits // 32,)
    words = torch.zeros(shape, dtype=torch.int64, device=codes.device).index_add_(-1, word, codes.long() << bit)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class SketchState:
    """One layer's packed key sketch for caches of up to `capacity` positions (module docstring).

    codes int32 [B, Hkv, capacity, d * bits / 32]; lo, hi [B, Hkv, capacity // block, d] in the key
    dtype. Entries of positions >= a row's length, of an unfinished first block and of blocks not
    finished are unspecified (never read).

    `kernels` (decided once, from `sketch_supported`): the Triton append keeps it and the kernels score
    from it. Otherwise (CPU without the interpreter, 4 or 8 bits, other block sizes or head dims,
    fp32 on CUDA) `append` is PyTorch (the same codes, bit for bit) and the method's PyTorch path
    scores from `dequantised`: the sketch is still kept incrementally, never rebuilt per step.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, capacity: int, *, bits: int = 2,
                 block: int = 128, dtype: torch.dtype = torch.float16, device: torch.device | str = "cuda") -> None:
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if head_dim % 16 or (head_dim * bits) % 32:
            raise ValueError(f"head_dim must be a multiple of 16 and head_dim * bits of 32, got {head_dim} * {bits}")
        self.kernels = sketch_supported(head_dim, bits, block, dtype, torch.device(device))
        self.batch, self.num_kv_heads, self.head_dim, self.capacity = batch, num_kv_heads, head_dim, capacity
        self.bits, self.block, self.dtype = bits, block, dtype
        self.device = torch.device(device)
        self.words = head_dim * bits // 32
        self.n_blocks = max(1, capacity // block)
        self.codes = torch.zeros(batch, num_kv_heads, capacity, self.words, dtype=torch.int32, device=self.device)
        self.lo = torch.zeros(batch, num_kv_heads, self.n_blocks, head_dim, dtype=dtype, device=self.device)
        self.hi = torch.zeros_like(self.lo)

    @classmethod
    def over(cls, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, bits: int, block: int) -> "SketchState":
        """A state over buffers someone else fills (serving's per-step sketch of the decode requests,
        gathered from the paged cache's kept sketch): codes int32 [B, Hkv, capacity, d * bits / 32]
        in `code_layout` order, lo / hi [B, Hkv, >= max(1, capacity // block), d] in the key dtype,
        all contiguous. Nothing is allocated or copied; `prefill` / `append` must not be called on it."""
        b, h, cap, words = codes.shape
        d = lo.shape[-1]
        if words * 32 != d * bits or lo.shape[:2] != (b, h) or lo.shape[2] < max(1, cap // block) \
                or hi.shape != lo.shape or not (codes.is_contiguous() and lo.is_contiguous() and hi.is_contiguous()):
            raise ValueError(f"codes {tuple(codes.shape)} / lo {tuple(lo.shape)} do not form a {bits}-bit sketch")
        self = cls.__new__(cls)
        self.kernels = sketch_supported(d, bits, block, lo.dtype, codes.device)
        self.batch, self.num_kv_heads, self.head_dim, self.capacity = b, h, d, cap
        self.bits, self.block, self.dtype, self.device = bits, block, lo.dtype, codes.device
        self.words, self.n_blocks = words, lo.shape[2]
        self.codes, self.lo, self.hi = codes, lo, hi
        return self

    def grow(self, capacity: int, used: int) -> None:
        """Room for `capacity` positions, keeping the first `used` (transformers' growing cache
        doubles it; a static cache never calls this)."""
        if capacity <= self.capacity:
            return
        codes = self.codes.new_zeros(self.batch, self.num_kv_heads, capacity, self.words)
        codes[:, :, :used] = self.codes[:, :, :used]
        n_blocks = max(1, capacity // self.block)
        lo = self.lo.new_zeros(self.batch, self.num_kv_heads, n_blocks, self.head_dim)
        hi = torch.zeros_like(lo)
        lo[:, :, : self.n_blocks], hi[:, :, : self.n_blocks] = self.lo, self.hi
        self.codes, self.lo, self.hi, self.capacity, self.n_blocks = codes, lo, hi, capacity, n_blocks

    def bytes_per_position(self) -> float:
        """State bytes per position per KV head (codes + amortised ranges)."""
        return self.words * 4 + 2 * self.head_dim * self.lo.element_size() / self.block

    def prefill(self, key: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor | None = None,
                chunk_elements: int = 1 << 24) -> None:
        """Build the sketch of key [B, Hkv, S, d] (S <= capacity), row b valid at
        [starts[b], starts[b] + lengths[b]). PyTorch, O(S * d), no host sync.

        Works through the positions in chunks of whole blocks (about `chunk_elements` key elements
        of all rows and heads at a time), so its temporaries are ~40 bytes per element of one
        chunk, not of the whole cache (at B=8 x 32k x 8 heads x 128 that would be ~11 GB per layer).
        """
        b, h, s, d = key.shape
        if (b, h, d) != (self.batch, self.num_kv_heads, self.head_dim) or s > self.capacity:
            raise ValueError(f"key {tuple(key.shape)} does not fit this sketch")
        dev = key.device
        lengths = lengths.to(dev).long()
        first = starts.to(dev).long() if starts is not None else torch.zeros_like(lengths)
        cap, blk, nb = self.capacity, self.block, self.n_blocks
        n_full = lengths // blk  # [B] finished blocks per row
        chunk = max(1, chunk_elements // (b * h * d * blk)) * blk  # positions per chunk, whole blocks

        def logical(p0: int, p1: int) -> torch.Tensor:
            """key at logical positions [p0, p1) of every row, fp32 [B, Hkv, p1 - p0, d]."""
            pos = torch.arange(p0, p1, device=dev)
            src = (first[:, None] + pos[None, :]).clamp(max=s - 1)
            return key.gather(2, src[:, None, :, None].expand(b, h, p1 - p0, d)).float()

        # 1. every finished block's per-channel range (blocks [0, n_full) of each row)
        for p0 in range(0, min(cap, nb * blk) // blk * blk, chunk):
            p1 = min(p0 + chunk, nb * blk)
            x = logical(p0, p1).reshape(b, h, (p1 - p0) // blk, blk, d)
            blocks = torch.arange(p0 // blk, p1 // blk, device=dev)
            done = (blocks[None, :] < n_full[:, None])[:, None, :, None]  # [B, 1, nblk, 1]
            lo, hi = x.amin(3), x.amax(3)  # a finished block has all its positions valid
            self.lo[:, :, p0 // blk: p1 // blk] = torch.where(done, lo, 0.0).to(self.dtype)
            self.hi[:, :, p0 // blk: p1 // blk] = torch.where(done, hi, 0.0).to(self.dtype)
        if cap < blk:  # capacity below one block: nothing is ever finished
            self.lo.zero_()
            self.hi.zero_()
        # 2. every position's codes, with its own block's range or the last finished one's
        levels = 2**self.bits - 1
        for p0 in range(0, cap, chunk):
            p1 = min(p0 + chunk, cap)
            pos = torch.arange(p0, p1, device=dev)
            x = logical(p0, p1)
            r = torch.minimum(pos[None, :] // blk, (n_full - 1).clamp_min(0)[:, None]).clamp(max=nb - 1)
            r4 = r[:, None, :, None].expand(b, h, p1 - p0, d)
            lo_p, hi_p = self.lo.float().gather(2, r4), self.hi.float().gather(2, r4)
            step = quant_step(lo_p, hi_p, levels)
            safe = torch.where(step > 0, step, torch.ones_like(step))
            codes = ((x - lo_p) / safe).round().clamp(0, levels).long()
            coded = (pos[None, :] < lengths[:, None]) & (n_full > 0)[:, None]
            codes = codes.masked_fill(~coded[:, None, :, None], 0)
            self.codes[:, :, p0:p1] = pack_codes(codes, self.bits)

    def append(self, key_new: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
               starts: torch.Tensor | None = None) -> None:
        """Code one new position per row in place, one launch, no host sync.

        key_new [B, Hkv, d] (or [B, Hkv, 1, d]; any batch/head strides); key: the K buffer
        [B, Hkv, S, d] already holding the new key (read only when it finishes a block);
        positions int [B] on the device: the new key's LOGICAL position (the row's length before
        it); starts as in `prefill`. A row with positions >= capacity is left as it is.
        """
        if key_new.dim() == 4:
            key_new = key_new[:, :, 0]
        if not self.kernels:
            self._append_torch(key_new, key, positions, starts)
            return
        if key_new.stride(-1) != 1 or key.stride(-1) != 1:
            raise ValueError("key_new and key must be contiguous along head_dim")
        b, h, d = key_new.shape
        has_starts = starts is not None
        pos = positions.to(torch.int32)
        _sketch_append_kernel[(b * h,)](
            key_new, key, self.codes, self.lo, self.hi, pos, starts.to(torch.int32) if has_starts else pos,
            key_new.stride(0), key_new.stride(1), key.stride(0), key.stride(1), key.stride(2),
            h, self.capacity, self.n_blocks,
            D=d, BITS=self.bits, BLOCK=self.block, HAS_STARTS=has_starts,
            num_warps=8 if self.block * d >= 16384 else 4,  # the finishing block sits in registers
        )

    def _encode(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """int64 codes of x (fp32) with the range lo, hi (fp32, broadcast): `prefill`'s operations."""
        levels = 2**self.bits - 1
        step = quant_step(lo, hi, levels)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        return ((x - lo) / safe).round().clamp(0, levels).long()

    def _append_torch(self, key_new: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                      starts: torch.Tensor | None) -> None:
        """`append` in PyTorch (the kernel's semantics, the same codes bit for bit, no host sync):
        every row computes both cases and a mask picks what is written, so the work per step is
        O(block * d) per row and KV head whatever happens."""
        b, h, d = key_new.shape
        blk, cap, dev = self.block, self.capacity, self.codes.device
        p = positions.to(dev).long()
        rows = torch.arange(b, device=dev)
        live = p < cap
        n_full = p // blk
        finishing = live & ((p + 1) % blk == 0)
        # the new position, coded with the last finished block's range (a row with one)
        r = (n_full - 1).clamp(0, self.n_blocks - 1)
        lo, hi = self.lo[rows, :, r].float(), self.hi[rows, :, r].float()  # [B, Hkv, d]
        words = pack_codes(self._encode(key_new.float(), lo, hi), self.bits)
        pc = p.clamp(max=cap - 1)
        write = (live & (n_full > 0) & ~finishing)[:, None, None]
        self.codes[rows, :, pc] = torch.where(write, words, self.codes[rows, :, pc])
        # a finished block: its range from the exact keys in the K buffer, then its codes
        if blk > cap:
            return
        first = starts.to(dev).long() if starts is not None else torch.zeros_like(p)
        j = n_full.clamp(max=self.n_blocks - 1)
        src = (first + j * blk)[:, None] + torch.arange(blk, device=dev)  # [B, blk] buffer rows
        x = key[rows[:, None], :, src.clamp(max=key.shape[2] - 1)]  # [B, blk, Hkv, d]
        x = x.transpose(1, 2)  # [B, Hkv, blk, d]
        blo, bhi = x.amin(2), x.amax(2)  # exact in the key dtype, as prefill stores them
        fin = finishing[:, None, None]
        self.lo[rows, :, j] = torch.where(fin, blo.to(self.dtype), self.lo[rows, :, j])
        self.hi[rows, :, j] = torch.where(fin, bhi.to(self.dtype), self.hi[rows, :, j])
        lo_f, hi_f = blo.to(self.dtype).float()[:, :, None], bhi.to(self.dtype).float()[:, :, None]
        bwords = pack_codes(self._encode(x.float(), lo_f, hi_f), self.bits)  # [B, Hkv, blk, W]
        dst = (j * blk)[:, None] + torch.arange(blk, device=dev)  # [B, blk] logical positions
        old = self.codes[rows[:, None], :, dst].transpose(1, 2)
        self.codes[rows[:, None], :, dst] = torch.where(fin[..., None], bwords, old).transpose(1, 2)

    def dequantised(self, lengths: torch.Tensor, upto: int | None = None, *, zero_invalid: bool = True) -> torch.Tensor:
        """The keys as the scorer sees them, [B, Hkv, n, d] fp32 in logical order (n = upto, default
        the capacity): what key_sketch returns on the coded rows, value for value. Rows with no
        finished block and positions >= length are zero (zero_invalid=False: unspecified but
        finite, for a caller that masks them anyway). O(n * d) elementwise work, per block (no
        per-position gather): the PyTorch scorer's step 1 on a kept sketch."""
        b, h, d, blk = self.batch, self.num_kv_heads, self.head_dim, self.block
        n = self.capacity if upto is None else upto
        if n > self.capacity:
            raise ValueError(f"{n} positions exceed the sketch's capacity {self.capacity}")
        dev = self.codes.device
        lengths = lengths.to(dev).long()
        nb = -(-n // blk)  # blocks covering [0, n)
        words = self.codes[:, :, : min(nb * blk, self.capacity)]
        if words.shape[2] < nb * blk:  # pad the packed words (1/16 of the unpacked size at 2 bits)
            words = torch.nn.functional.pad(words, (0, 0, 0, nb * blk - words.shape[2]))
        word, bit = code_layout(d, self.bits, dev)
        codes = ((words[..., word] >> bit.to(torch.int32)) & (2**self.bits - 1)).float().reshape(b, h, nb, blk, d)
        n_full = lengths // blk
        # block j is coded with its own range, or (unfinished) the last finished block's
        r = torch.minimum(torch.arange(nb, device=dev)[None, :], (n_full - 1).clamp_min(0)[:, None])
        r4 = r.clamp(max=self.n_blocks - 1)[:, None, :, None].expand(b, h, nb, d)
        lo, hi = self.lo.float().gather(2, r4)[:, :, :, None], self.hi.float().gather(2, r4)[:, :, :, None]
        # lo + c * step: where step is 0 (a constant channel) that is lo, as key_sketch's where() gives
        deq = codes.mul_(quant_step(lo, hi, 2**self.bits - 1)).add_(lo).reshape(b, h, nb * blk, d)[:, :, :n]
        if zero_invalid:
            pos = torch.arange(n, device=dev)
            coded = (pos[None, :] < lengths[:, None]) & (n_full > 0)[:, None]
            deq = deq.masked_fill(~coded[:, None, :, None], 0.0)
        return deq
