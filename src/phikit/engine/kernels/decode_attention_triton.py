"""Triton kernel behind `decode_attention` (one query, grouped-query heads, a masked static KV cache).

Grid: (key/value heads, splits of the cache). A program loads the G query
heads that share its key/value head as one [GP, D] tile (GP >= 16 rows, the
unused ones zero, so the scores are a tensor-core product), then walks its
part of the cache in BLOCK_S slots with an online softmax in fp32. Slots the
mask excludes get a score of -inf. The K/V loads do not wait on the mask: a
first version predicated them on it (to skip the unfilled tail of the cache),
which put two memory latencies in series per block, and with one program per
head it took 13 µs per layer on the H100, slower than cuDNN's SDPA. So the
cache is split over many programs (about SLOTS_PER_PROGRAM slots each), each
loading its slots at once, and a second small kernel (one program per query
head) combines the partials (max, sum, weighted values). With one split the
program writes the output. Given the position instead of a mask (the fast
path's decode step), a program walks its slots only up to it, as the batched
kernel does: a cache longer than the sequence costs a few idle programs, not
its bandwidth (before, every step read the whole cache, filled or not).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Tile sizes of the registered op, set from the H100 measurement in docs/speed.md (benchmarks/speed/decode_profile.py).
SLOTS_PER_PROGRAM = 64
BLOCK_S = 64


@triton.jit
def _online_softmax_block(q, k, v, keep, scale, m_i, l_i, acc):
    """One block of keys/values into the running (max, sum, weighted values) of an online softmax, in fp32."""
    qk = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK_S]
    qk = tl.where(keep[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet: no NaN from -inf - -inf
    p = tl.exp(qk - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def _store(acc, m_i, l_i, heads, real, d, part, out_ptr, m_ptr, l_ptr, D: tl.constexpr, SPLITS: tl.constexpr):
    """With one split, the output rows `heads`; else this split's partials of them (combined by _combine_kernel)."""
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + heads[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=real[:, None])
    else:
        rows = heads * SPLITS + part
        tl.store(out_ptr + rows[:, None] * D + d[None, :], acc, mask=real[:, None])
        tl.store(m_ptr + rows, m_i, mask=real)
        tl.store(l_ptr + rows, l_i, mask=real)


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, out_ptr, m_ptr, l_ptr, scale, S,
                 stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                 SPLIT_S: tl.constexpr, SPLITS: tl.constexpr, USE_POS: tl.constexpr):
    h = tl.program_id(0)
    part = tl.program_id(1)
    lo = part * SPLIT_S
    hi = tl.minimum(lo + SPLIT_S, S)
    if USE_POS:  # causal over cache slots: slot s holds position s, so the walk stops at the position
        hi = tl.minimum(hi, tl.load(pos_ptr) + 1)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (h * G + g)[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        inside = s < hi
        if USE_POS:
            keep = inside
        else:
            keep = (tl.load(mask_ptr + s, mask=inside, other=0) != 0) & inside
        k = tl.load(k_ptr + h * stride_kh + s[:, None] * stride_ks + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(v_ptr + h * stride_vh + s[:, None] * stride_vs + d[None, :], mask=inside[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_block(q, k, v, keep, scale, m_i, l_i, acc)
    # the real query heads only: the output [Hq, D], or partials [Hq, SPLITS, D] and [Hq, SPLITS]
    _store(acc, m_i, l_i, h * G + g, g < G, d, part, out_ptr, m_ptr, l_ptr, D, SPLITS)


@triton.jit
def _combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr):
    # One program per query head: a [SPLITS, D] tile. (A first version took a [SPLITS, 16, D] tile per
    # key/value head, the padded rows included, and spent 7 µs per layer there.)
    hq = tl.program_id(0)
    rows = hq * SPLITS + tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    m = tl.load(m_ptr + rows)
    l = tl.load(l_ptr + rows)
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # an empty split (m = -inf) weighs 0
    acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + hq * D + d, out.to(out_ptr.dtype.element_ty))


def _plan(s: int, hq: int, hkv: int, slots_per_program: int | None, block_s: int | None, rows: int = 1,
          max_programs: int | None = None) -> tuple[int, int, int, int, int]:
    """How the cache of `s` slots is walked: (BLOCK_S, splits, slots per split, query heads per key/value head,
    that rounded up to a tl.dot tile). About `slots_per_program` slots per program, at most 64 splits (a power of
    two for the combine kernel); `slots_per_program >= s` gives one program per head, no combine. With
    `max_programs`, no more splits than keep the grid (rows, key/value heads, splits) within it."""
    slots_per_program = slots_per_program or SLOTS_PER_PROGRAM
    block_s = min(block_s or BLOCK_S, triton.next_power_of_2(slots_per_program))
    splits = min(64, triton.next_power_of_2(triton.cdiv(s, slots_per_program)))
    if max_programs and rows * hkv * splits > max_programs:
        splits = 1 << max(0, (max_programs // (rows * hkv)).bit_length() - 1)  # the largest power of two within it
    g = hq // hkv
    gp = max(16, triton.next_power_of_2(g))  # tl.dot wants >= 16 rows
    split_s = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    return block_s, splits, split_s, g, gp


def _partials(out: torch.Tensor, heads: int, d: int, splits: int):
    """Where the attention kernels write (values, max, sum) for `heads` query heads: with one split the output itself
    (m and l are not touched), else fp32 partials for the combine kernel."""
    if splits == 1:
        return out, out, out
    acc = torch.empty((heads * splits, d), dtype=torch.float32, device=out.device)
    m = torch.empty((heads * splits,), dtype=torch.float32, device=out.device)
    return acc, m, torch.empty_like(m)


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                            slots_per_program: int | None = None, block_s: int | None = None,
                            num_warps: int = 4, position: torch.Tensor | None = None) -> torch.Tensor:
    """q [1, Hq, 1, D], k/v [1, Hkv, S, D] (last dim contiguous), mask [1, 1, 1, S] bool -> [1, 1, Hq, D].

    With `position` (a one-element integer tensor) instead of a mask, the kept slots are 0..position.

    The cache is split so that each program walks about `slots_per_program` slots (at most 64 splits,
    a power of two for the combine kernel); `slots_per_program >= S` gives one program per head, no combine.
    """
    _, hq, _, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("decode_attention_triton needs the cache's last dimension contiguous")
    block_s, splits, split_s, g, gp = _plan(s, hq, hkv, slots_per_program, block_s)
    q2 = q.reshape(hq, d)
    if q2.stride(1) != 1:
        q2 = q2.contiguous()
    if (mask is None) == (position is None):
        raise ValueError("decode_attention_triton takes a mask or a position, exactly one")
    maskb = mask.reshape(s).view(torch.uint8) if mask is not None else position
    out = torch.empty((1, 1, hq, d), dtype=q.dtype, device=q.device)
    part_acc, m, l = _partials(out, hq, d, splits)
    _attn_kernel[(hkv, splits)](q2, k, v, maskb, position if position is not None else maskb, part_acc, m, l, scale, s,
                                q2.stride(0), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
                                G=g, GP=gp, D=d, BLOCK_S=block_s, SPLIT_S=split_s, SPLITS=splits, USE_POS=position is not None,
                                num_warps=num_warps)
    if splits > 1:
        _combine_kernel[(hq,)](part_acc, m, l, out, D=d, SPLITS=splits, num_warps=2)
    return out


@torch.library.custom_op("phikit::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     position: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """One-query grouped attention over a static cache, slots kept by `mask` or 0..`position`: -> [1, 1, Hq, D]."""
    # Optional[...] rather than "X | None": the form every torch version's schema inference reads
    return decode_attention_triton(q, k, v, mask, scale, position=position)


@decode_attention.register_fake
def _(q, k, v, mask, position, scale):
    return q.new_empty((1, 1, q.shape[1], q.shape[-1]))


@triton.jit
def _slot_attn_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, out_ptr, m_ptr, l_ptr, scale,
                      stride_qr, stride_qh, stride_kslot, stride_ks, stride_kh, stride_vslot, stride_vs, stride_vh,
                      HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                      SPLIT_S: tl.constexpr, SPLITS: tl.constexpr):
    # The batched form of _attn_kernel: grid (rows, key/value heads, splits); row r reads its own slot, positions
    # 0..pos[r] only (the loop stops at the row's position: a short sequence does not pay for the slot's length).
    r = tl.program_id(0)
    h = tl.program_id(1)
    part = tl.program_id(2)
    slot = tl.load(slot_ptr + r).to(tl.int64)
    pos = tl.load(pos_ptr + r)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + r * stride_qr + (h * G + g)[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    k_base = k_ptr + slot * stride_kslot + h * stride_kh
    v_base = v_ptr + slot * stride_vslot + h * stride_vh
    lo = part * SPLIT_S
    hi = tl.minimum(lo + SPLIT_S, pos + 1)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        keep = s <= pos
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=keep[:, None], other=0.0)
        v = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=keep[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_block(q, k, v, keep, scale, m_i, l_i, acc)
    # the output [R * Hq, D], or partials [R * Hq, SPLITS, D] and [R * Hq, SPLITS]; a split past the row's position
    # leaves m = -inf, l = 0
    _store(acc, m_i, l_i, r * HQ + h * G + g, g < G, d, part, out_ptr, m_ptr, l_ptr, D, SPLITS)


# The most programs the batched kernel splits a step's slots into: about 8 per SM of an H100 or H200 (132 SMs).
SLOT_PROGRAMS = 1024


def slot_decode_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor,
                                 scale: float, slots_per_program: int | None = None, num_warps: int = 4,
                                 max_programs: int | None = SLOT_PROGRAMS) -> torch.Tensor:
    """q [R, Hq, 1, D], keys/values [slots, L, Hkv, D] (last dim contiguous), slot/pos [R] -> [R, 1, Hq, D].

    The slots are split as for one row (`_plan`, by the slot length L), but into no more splits than keep the grid
    (rows, key/value heads, splits) within `max_programs` (None: no bound; `_plan` applies it): rows and heads fill the GPU at larger
    batches, and the grid is fixed by L (a captured step cannot see the positions), so a program whose split lies
    past its row's position still costs its launch. Unbounded, 64 rows of Phi-4-mini (8 key/value heads, 32 splits
    of 2,048 slots) made 16,384 programs, most of them empty: 128 us a layer on the H100, 45% of the decode step
    (benchmarks/speed/batch_decode.py --profile)."""
    r, hq, _, d = q.shape
    length, hkv = keys.shape[1], keys.shape[2]
    if keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("slot_decode_attention_triton needs the cache's last dimension contiguous")
    block_s, splits, split_s, g, gp = _plan(length, hq, hkv, slots_per_program, None, r, max_programs)
    q2 = q.reshape(r, hq, d)
    if q2.stride(2) != 1:
        q2 = q2.contiguous()
    out = torch.empty((r, 1, hq, d), dtype=q.dtype, device=q.device)
    part_acc, m, l = _partials(out, r * hq, d, splits)
    _slot_attn_kernel[(r, hkv, splits)](q2, keys, values, slot, pos, part_acc, m, l, scale,
                                        q2.stride(0), q2.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
                                        values.stride(0), values.stride(1), values.stride(2),
                                        HQ=hq, G=g, GP=gp, D=d, BLOCK_S=block_s, SPLIT_S=split_s, SPLITS=splits, num_warps=num_warps)
    if splits > 1:
        _combine_kernel[(r * hq,)](part_acc, m, l, out, D=d, SPLITS=splits, num_warps=2)
    return out


@torch.library.custom_op("phikit::slot_decode_attention", mutates_args=())
def slot_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """One query per row over that row's slot of a slot cache, positions 0..pos[row]: -> [R, 1, Hq, D]."""
    return slot_decode_attention_triton(q, keys, values, slot, pos, scale)


@slot_decode_attention.register_fake
def _(q, keys, values, slot, pos, scale):
    return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[-1]))
