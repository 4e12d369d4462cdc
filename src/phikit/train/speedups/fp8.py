"""The frozen base's matrix products in FP8 (opt-in: `SpeedOptions.fp8`, `phikit train --fp8`). Inside the
compiled layers (nf4.py) each NF4 weight, dequantised as before, and the activations or output gradients it
multiplies are cast to e4m3 with one fp32 scale per row (torchao's "rowwise" float8 recipe), and the product
runs on the FP8 tensor cores (`torch._scaled_mm`, bf16 out): the output in the forward, the input gradient in
the backward. The base takes no weight gradient; LoRA, attention, the norms and the loss stay in bf16.

Why: an H100/H200 runs FP8 products at twice bf16's rate, and the base's products are most of a QLoRA
step's matmul time. Why not torchao's Float8Linear: it wants a 16-bit `nn.Linear` weight it owns and makes
that weight's gradient; here the weight is NF4, frozen and dequantised inside the compiled graph, so the
casts fuse into that dequantisation and only two products run.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def rowwise(t: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (e4m3 [R, C] contiguous, fp32 scale [R, 1]) with t ~= q * scale: each row's largest |value| at
    e4m3's largest (448), or `scale` where the caller knows it (a frozen weight's, computed once)."""
    t = t.float()
    if scale is None:
        scale = t.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (t / scale).to(E4M3).contiguous(), scale


def weight_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen [N, K] weight's rowwise scales for both products: per output row [N, 1] (y = x @ w.T) and per
    input column [K, 1] (dx = dy @ w, which takes w.T's rows). Computed once: they never change."""
    a = w.float().abs()
    return (a.amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX, a.amax(0)[:, None].clamp(min=1e-12) / E4M3_MAX)


def fits(m: int, n: int, k: int) -> bool:
    """Whether `_scaled_mm` takes an [m, k] x [k, n] product: every dimension a multiple of 16."""
    return not (m % 16 or n % 16 or k % 16)


class FP8Linear(torch.autograd.Function):
    """y = x @ w.T in FP8 (rowwise e4m3), and dx = dy @ w in FP8; w is frozen (no gradient). `rows`, `cols`:
    w's scales (weight_scales), or None to measure them here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = rowwise(x2)
        wq, ws = rowwise(w, rows)  # [N, K]; .t() is the column-major [K, N] _scaled_mm wants second
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=x.dtype)
        if ctx.needs_input_grad[0]:  # the backward's operand, scaled per input feature: w.T as [K, N] rows
            ctx.save_for_backward(*rowwise(w.t(), cols))
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        wtq, wts = ctx.saved_tensors  # [K, N] e4m3, [K, 1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        gq, gs = rowwise(dy2)
        dx = torch._scaled_mm(gq, wtq.t(), scale_a=gs, scale_b=wts.t(), out_dtype=dy.dtype)
        return dx.view(*dy.shape[:-1], wtq.shape[0]), None, None, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` with the product in FP8 where `_scaled_mm` takes its shape (else in x's dtype).
    `w` is frozen: it gets no gradient. `scales`: its weight_scales, if known."""
    if not fits(x.numel() // x.shape[-1], w.shape[0], w.shape[1]):
        return torch.nn.functional.linear(x, w.to(x.dtype), bias)
    y = FP8Linear.apply(x, w.detach(), *(scales or (None, None)))
    return y if bias is None else y + bias
