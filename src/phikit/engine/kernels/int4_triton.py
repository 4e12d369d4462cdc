"""Triton kernels for group-wise int4 weight-only matmuls (the CUDA path of `int4.Int4Linear`).

Why our own kernels: PyTorch's tinygemm (`_weight_int4pack_mm`) is slow at
M=128 (a prefill chunk: 4-5x slower than dequantise + cuBLAS), and was
measured at 450-1,500 GB/s at M=1. (Timed inside CUDA graphs, as the decode
path runs it, tinygemm turned out faster than first measured, and still ahead
of this GEMV on every shape: see docs/speed.md. `int4.Int4Linear` therefore
uses tinygemm for decode by default and these kernels for prefill.)
GemLite (the maintained Triton int4 library) targets fp16 activations, brings
its own packing, autotune cache and dependencies, and would have to be carried
to a machine without network; a GEMV plus a dequantise kernel is ~150 lines,
keeps exactly the quantised values `int4.quantize_int4` makes, and is tuned
here for the shapes we run.

Layout (made by `int4.pack_int4_words`): codes packed into int32 words,
`qweight[N, K // 8]`. Within each group of 128 input features, word i
(0..15) holds k = 16 * j + i in nibble j (bits 4j..4j+3). A program then
loads contiguous words along a row (wide, coalesced loads) and nibble j of a
tile of words meets a contiguous run of 16 x values, so no shuffle is needed.
Scales and zero points are bf16 `[N, K // group]`; w = (q - 8) * scale + zero.

- `gemv` (M small, the decode step): each program computes BLOCK_N output rows
  of one input row over the whole K, a few groups per step as a
  [BLOCK_N, groups, 16] tile of words (many rows per program, no split-K: the
  layers have >= 3,072 rows, enough programs to fill the GPU). Codes become
  floats by bit tricks rather than conversions (see `_nibble`), the group's
  scale is applied once per group, and accumulation is fp32.
- `skinny_mm` (M from 9 to 64: a batch of decoding sequences): the weight is read once for all rows;
  each program dequantises a [BLOCK_N, 16] tile of one group per nibble in registers and multiplies
  it into the rows with `tl.dot` (tensor cores), fp32 accumulation. Before it, a batch above 8 rows
  dequantised the whole weight to bf16 every step and then multiplied: on the H100 an int4 decode
  step at 16 rows took 11.1 ms against bf16's 7.7 (benchmarks/results/batch_decode_h100.jsonl).
- `dequantize` + cuBLAS (M large, the prefill chunk): the layer's weight is
  dequantised to bf16 into a temporary (freed, so the allocator reuses one
  block layer after layer, inside a captured graph too) and multiplied by
  torch.mm. At M=128 this measured 4-5x faster than tinygemm (see docs/speed.md).

`int4_mm` is registered as the torch custom op `phikit::int4_mm` with a fake
implementation, so torch.compile traces it (as an opaque call) and CUDA
graphs capture its launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 8  # up to this many rows of x the GEMV reads the weight once per row
SKINNY_MAX_M = 64  # up to this many rows, skinny_mm reads it once for all rows; above, dequantise + cuBLAS


@triton.jit
def _nibble(words, J: tl.constexpr):
    """Nibble J of each word as the float 1 + q/16: the code moved to mantissa bits 19..22 under the exponent of 1.0.

    Two integer ops (shift, and-or) and no conversion instruction, whose throughput would cap the GEMV
    below memory speed; v * x - x = q * x / 16 loses no precision that matters, as both terms are O(x).
    """
    if 4 * J <= 19:
        t = words << (19 - 4 * J)
    else:
        t = words >> (4 * J - 19)
    return ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, stride_xm, stride_ym, K: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, GROUP: tl.constexpr):
    WPG: tl.constexpr = GROUP // 8  # words per group
    KW: tl.constexpr = K // 8
    NG: tl.constexpr = K // GROUP
    GT: tl.constexpr = GROUPS_PER_STEP
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    gi = tl.arange(0, GT)
    wi = tl.arange(0, WPG)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N, GT), dtype=tl.float32)
    for g0 in range(0, NG, GT):
        g = g0 + gi
        gmask = g < NG
        mask2 = rmask[:, None] & gmask[None, :]
        mask3 = mask2[:, :, None]
        # [BLOCK_N, GT, 16] words: each (row, group) is 64 contiguous bytes
        words = tl.load(w_ptr + rows[:, None, None] * KW + g[None, :, None] * WPG + wi[None, None, :], mask=mask3, other=0)
        s = tl.load(s_ptr + rows[:, None] * NG + g[None, :], mask=mask2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * NG + g[None, :], mask=mask2, other=0.0).to(tl.float32)
        xoff = g[:, None] * GROUP + wi[None, :]  # [GT, 16]: the k of nibble 0 of each word
        va = tl.zeros((BLOCK_N, GT, WPG), dtype=tl.float32)
        xs = tl.zeros((GT, WPG), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_row + xoff + j * WPG, mask=gmask[:, None], other=0.0).to(tl.float32)
            va += _nibble(words, j) * xj[None, :, :]
            xs += xj
        a = tl.sum(va, axis=2)  # sum over the group of (1 + q/16) * x
        xg = tl.sum(xs, axis=1)[None, :]  # sum over the group of x
        # sum ((q - 8) * s + z) * x = s * (16 * (a - xg) - 8 * xg) + z * xg
        acc += s * (16.0 * (a - xg) - 8.0 * xg) + z * xg
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, stride_xm, stride_ym, K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    WPG: tl.constexpr = GROUP // 8  # words per group: nibble j of word i is k = 16 * j + i of the group
    KW: tl.constexpr = K // 8
    NG: tl.constexpr = K // GROUP
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = rows < N
    mmask = ms < M
    wi = tl.arange(0, WPG)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(NG):
        words = tl.load(w_ptr + rows[:, None] * KW + g * WPG + wi[None, :], mask=nmask[:, None], other=0)  # [BLOCK_N, 16]
        s = tl.load(s_ptr + rows * NG + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + rows * NG + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
        for j in tl.static_range(8):
            q = ((words >> (4 * j)) & 15).to(tl.float32)
            w = ((q - 8.0) * s + z).to(x_ptr.dtype.element_ty)  # [BLOCK_N, 16]: k = g * GROUP + 16 * j + (0..15)
            xk = tl.load(x_ptr + ms[:, None] * stride_xm + g * GROUP + j * WPG + wi[None, :], mask=mmask[:, None], other=0.0)
            acc += tl.dot(xk, tl.trans(w))
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K: tl.constexpr,
                    BLOCK_N: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, GROUP: tl.constexpr):
    WPG: tl.constexpr = GROUP // 8
    KW: tl.constexpr = K // 8
    NG: tl.constexpr = K // GROUP
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * GROUPS_PER_STEP + tl.arange(0, GROUPS_PER_STEP)
    wi = tl.arange(0, WPG)
    mask2 = (rows < N)[:, None] & (g < NG)[None, :]
    mask3 = mask2[:, :, None]
    words = tl.load(w_ptr + rows[:, None, None] * KW + g[None, :, None] * WPG + wi[None, None, :], mask=mask3, other=0)
    s = tl.load(s_ptr + rows[:, None] * NG + g[None, :], mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(z_ptr + rows[:, None] * NG + g[None, :], mask=mask2, other=0.0).to(tl.float32)[:, :, None]
    out = out_ptr + rows[:, None, None].to(tl.int64) * K + (g[None, :, None] * GROUP + wi[None, None, :])
    for j in tl.static_range(8):
        q = ((words >> (4 * j)) & 15).to(tl.float32)
        # each (row, group, j) writes 16 contiguous values
        tl.store(out + j * WPG, ((q - 8.0) * s + z).to(out_ptr.dtype.element_ty), mask=mask3)


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, groups per K step, num_warps) for an [n, k] weight; from the sweep in benchmarks/speed/int4_gemv.py on an H100."""
    # Each thread should hold several rows of the same columns (its x loads serve them all) while
    # the layer still spreads over enough programs to fill 132 SMs; the head has rows to spare.
    # Sweep (CUDA-graph timed, H100): 8 rows x 8 groups x 8 warps was best on qkv, o and down;
    # gate_up gained 4% from 32 rows; the head took 16 rows x 8 groups x 4 warps.
    if n >= 65536:
        return 16, 8, 4
    if n >= 16384:
        return 32, 8, 8
    return 8, 8, 8


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    n, kw = qweight.shape
    k = kw * 8
    if x.shape[-1] != k or k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"int4 shapes do not match: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group {group_size}")


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 128,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ dequant(W)^T, one weight pass per row of x (for small M)."""
    _check(x, qweight, scales, zeros, group_size)
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    block_n, gt, warps = config or gemv_config(n, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), m)
    _gemv_kernel[grid](x, qweight, scales, zeros, y, n, x.stride(0), y.stride(0), K=k,
                       BLOCK_N=block_n, GROUPS_PER_STEP=gt, GROUP=group_size, num_warps=warps)
    return y


def skinny_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 128,
              block_n: int = 32, num_warps: int = 4) -> torch.Tensor:
    """y[M, N] = x[M, K] @ dequant(W)^T for a few dozen rows: the weight read once for up to 64 rows."""
    _check(x, qweight, scales, zeros, group_size)
    if group_size != 128:
        raise ValueError(f"skinny_mm takes groups of 128 input features, got {group_size}")
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    block_m = max(16, min(64, triton.next_power_of_2(m)))  # tl.dot needs 16; one block of rows up to 64
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _skinny_kernel[grid](x, qweight, scales, zeros, y, m, n, x.stride(0), y.stride(0), K=k,
                         BLOCK_M=block_m, BLOCK_N=block_n, GROUP=group_size, num_warps=num_warps)
    return y


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 128,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The [N, K] weight, (q - 8) * scale + zero computed in fp32 and rounded to `dtype`."""
    n, kw = qweight.shape
    k = kw * 8
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    block_n, gt = 16, 4
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // group_size, gt))
    _dequant_kernel[grid](qweight, scales, zeros, out, n, K=k, BLOCK_N=block_n, GROUPS_PER_STEP=gt, GROUP=group_size, num_warps=4)
    return out


@torch.library.custom_op("phikit::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x[M, K] @ W^T for int4 W: the GEMV for M <= GEMV_MAX_M, skinny_mm up to SKINNY_MAX_M, else dequantise to x's
    dtype and use torch.mm."""
    if x.shape[0] <= GEMV_MAX_M:
        return gemv(x, qweight, scales, zeros, group_size)
    if x.shape[0] <= SKINNY_MAX_M and group_size == 128:
        return skinny_mm(x, qweight, scales, zeros, group_size)
    _check(x, qweight, scales, zeros, group_size)
    return torch.mm(x, dequantize(qweight, scales, zeros, group_size, x.dtype).t())


@int4_mm.register_fake
def _(x, qweight, scales, zeros, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))
