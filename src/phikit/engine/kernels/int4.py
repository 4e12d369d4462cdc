"""4-bit weight-only linear layers: group-wise asymmetric int4 with bf16 scales and zero points.

The matrix-vector work on CUDA is PyTorch's own tinygemm kernel
(`torch.ops.aten._weight_int4pack_mm`, the kernel behind torchao's int4
weight-only mode): maintained, compiled into every CUDA build of torch, and
traceable by torch.compile, so no kernel of our own is needed. Off CUDA the
layer multiplies by the dequantised weight, which is also the reference the
fast path is checked against.

Format (tinygemm's "float zero point" domain), per group of `group_size`
input features of one output row:
    w ~= (q - 8) * scale + zero,   q in 0..15
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZE = 128
INNER_K_TILES = 8  # tinygemm's packing parameter; 8 is torchao's default for int4 weight-only


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise a [N, K] weight to codes (uint8 in 0..15, [N, K]), scales and zeros (bf16, [N, K // group_size])."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = weight.float().reshape(n, k // group_size, group_size)
    lo = w.amin(-1)
    hi = w.amax(-1)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zero = (lo + scale.float() * 8).to(torch.bfloat16)
    # Quantise against the bf16-rounded parameters, the ones the kernel will use.
    base = zero.float() - scale.float() * 8
    q = ((w - base[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The bf16 weight that int4 codes stand for: (q - 8) * scale + zero, per group."""
    n, k = q.shape
    w = (q.float().reshape(n, k // group_size, group_size) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(n, k).to(torch.bfloat16)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, K // 2] uint8, even column in the high nibble (tinygemm's input order)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`."""
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)


def can_quantize(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
    """tinygemm needs K a multiple of the group and of 16 * inner_k_tiles, and N a multiple of 8."""
    return linear.in_features % max(group_size, 16 * INNER_K_TILES) == 0 and linear.out_features % 8 == 0


class Int4Linear(nn.Module):
    """A bias-optional linear layer with group-wise int4 weights (tinygemm on CUDA, dequantise elsewhere)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = GROUP_SIZE):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        q, scale, zero = quantize_int4(weight.detach(), group_size)
        self.on_cuda = weight.is_cuda
        if self.on_cuda:
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), INNER_K_TILES)
            # tinygemm wants [K / group, N, 2] with (scale, zero) pairs
            sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        else:
            packed = pack_nibbles(q)
            sz = torch.stack([scale, zero], dim=-1)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        """The bf16 weight this layer computes with (CPU layout only)."""
        return dequantize_int4(unpack_nibbles(self.packed), self.scales_and_zeros[..., 0], self.scales_and_zeros[..., 1], self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.on_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = nn.functional.linear(x2, self.dequantized().to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _linears(model: nn.Module, include_lm_head: bool):
    head = model.get_output_embeddings() if include_lm_head else None
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and (child is not head or include_lm_head):
                yield mod, child_name, child


def quantize_model_int4(model: nn.Module, group_size: int = GROUP_SIZE, include_lm_head: bool = True) -> nn.Module:
    """Replace every quantisable nn.Linear (the tied lm_head too, untied from the bf16 input embedding) by Int4Linear, in place."""
    for parent, name, lin in _linears(model, include_lm_head):
        if can_quantize(lin, group_size):
            setattr(parent, name, Int4Linear(lin.weight, lin.bias, group_size))
            del lin
    model.config.tie_word_embeddings = False  # the input embedding stays bf16; only the head is int4
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def dequantize_model_reference(model: nn.Module, group_size: int = GROUP_SIZE, include_lm_head: bool = True) -> nn.Module:
    """In place: give every linear that `quantize_model_int4` would quantise the dequantised int4 weight, in bf16.

    This is the reference path for the same quantised weights: the stock
    transformers loop runs it with ordinary bf16 matmuls.
    """
    head = model.get_output_embeddings()
    if include_lm_head and head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())  # untie: the embedding stays bf16
    for _, _, lin in _linears(model, include_lm_head):
        if can_quantize(lin, group_size):
            with torch.no_grad():
                lin.weight.copy_(dequantize_int4(*quantize_int4(lin.weight, group_size), group_size))
    model.config.tie_word_embeddings = False
    return model
