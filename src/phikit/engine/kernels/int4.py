"""4-bit weight-only linear layers: group-wise asymmetric int4 with bf16 scales and zero points.

On CUDA, by default, the decode step's matrix-vector products run PyTorch's
own tinygemm kernel (`torch.ops.aten._weight_int4pack_mm`, the kernel behind
torchao's int4 weight-only mode), and prefill chunks run our Triton
dequantise + cuBLAS (`int4_triton`), 4-5x faster than tinygemm at M=128. Our
Triton GEMV is also available (kernel="triton", one copy of the codes) but
measured slower than tinygemm at M=1 on the H100 (docs/speed.md). Without
triton, tinygemm does everything. Off CUDA the layer multiplies by the
dequantised weight, which is also the reference the fast path is checked
against.

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


def pack_int4_words(q: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """[N, K] codes -> [N, K // 8] int32 in the Triton kernels' layout: in each group, word i holds k = 16*j + i in nibble j."""
    n, k = q.shape
    wpg = group_size // 8
    q = q.to(torch.int32).reshape(n, k // group_size, 8, wpg).transpose(2, 3)  # [.., i, j]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    # nibble 7 lands in the sign bit: int32 arithmetic wraps, which is the bit pattern we want
    return (q << shifts).sum(-1, dtype=torch.int32).reshape(n, k // 8)


def unpack_int4_words(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Inverse of `pack_int4_words`: [N, K // 8] int32 -> [N, K] uint8 codes."""
    n, kw = w.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    q = (w[..., None] >> shifts) & 15  # [N, K/8, j]
    return q.reshape(n, kw * 8 // group_size, group_size // 8, 8).transpose(2, 3).reshape(n, kw * 8).to(torch.uint8)


def triton_available() -> bool:
    """Whether the Triton int4 kernels can be used (triton importable and a CUDA device present)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def can_quantize(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
    """tinygemm needs K a multiple of the group and of 16 * inner_k_tiles, and N a multiple of 8."""
    return linear.in_features % max(group_size, 16 * INNER_K_TILES) == 0 and linear.out_features % 8 == 0


KERNELS = ("tinygemm+triton", "triton", "tinygemm", "dequant")


def default_kernel(device: torch.device | str) -> str:
    """Int4Linear's compute path for weights on `device` (see `Int4Linear`)."""
    if torch.device(device).type != "cuda":
        return "dequant"
    return "tinygemm+triton" if triton_available() else "tinygemm"


class Int4Linear(nn.Module):
    """A bias-optional linear layer with group-wise int4 weights.

    `kernel` says what computes it:
      - "tinygemm+triton" (CUDA with triton; the default there): tinygemm for decode-shaped inputs
        (M <= 8), our Triton dequantise + cuBLAS for prefill chunks. It keeps the codes twice, once
        per layout (about 1.5x the int4 weight memory), because on the H100 tinygemm is still the
        faster GEMV and ours the much faster prefill (docs/speed.md);
      - "triton": our Triton kernels only (GEMV for M <= 8, dequantise + cuBLAS above), one copy;
      - "tinygemm": tinygemm only (CUDA without triton);
      - "dequant": matmul by the dequantised weight (off CUDA; the reference).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = GROUP_SIZE,
                 kernel: str | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        kernel = kernel or default_kernel(weight.device)
        if kernel not in KERNELS:
            raise ValueError(f"unknown int4 kernel {kernel!r}: use one of {', '.join(KERNELS)}")
        self.kernel = kernel
        q, scale, zero = quantize_int4(weight.detach(), group_size)
        if "triton" in kernel:
            from . import int4_triton  # importing it registers torch.ops.phikit.int4_mm, before any trace

            # Rows of x up to which a matmul is decode-shaped (int4_mm's GEMV side; tinygemm's here in
            # "tinygemm+triton"); above, prefill-shaped: dequantise + cuBLAS.
            self.gemv_max_m = int4_triton.GEMV_MAX_M
            self.register_buffer("qweight", pack_int4_words(q, group_size))
            self.register_buffer("scales", scale.contiguous())
            self.register_buffer("zeros", zero.contiguous())
        if "tinygemm" in kernel:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(), INNER_K_TILES))
            # tinygemm wants [K / group, N, 2] with (scale, zero) pairs
            self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        if kernel == "dequant":
            self.register_buffer("packed", pack_nibbles(q))
            self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        """The bf16 weight this layer computes with (any kernel but plain "tinygemm", whose layout is not unpacked here)."""
        if "triton" in self.kernel:
            return dequantize_int4(unpack_int4_words(self.qweight, self.group_size), self.scales, self.zeros, self.group_size)
        if self.kernel == "tinygemm":
            raise NotImplementedError("tinygemm's packed layout is not unpacked here; quantise a copy with kernel='dequant'")
        return dequantize_int4(unpack_nibbles(self.packed), self.scales_and_zeros[..., 0], self.scales_and_zeros[..., 1], self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # M is static under torch.compile(dynamic=False): each captured graph holds one branch
        if self.kernel == "triton" or (self.kernel == "tinygemm+triton" and x2.shape[0] > self.gemv_max_m):
            y = torch.ops.phikit.int4_mm(x2.to(torch.bfloat16), self.qweight, self.scales, self.zeros, self.group_size)
        elif "tinygemm" in self.kernel:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = nn.functional.linear(x2, self.dequantized().to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, kernel={self.kernel}"


def _linears(model: nn.Module, include_lm_head: bool):
    head = model.get_output_embeddings() if include_lm_head else None
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and (child is not head or include_lm_head):
                yield mod, child_name, child


def quantize_model_int4(model: nn.Module, group_size: int = GROUP_SIZE, include_lm_head: bool = True,
                        kernel: str | None = None) -> nn.Module:
    """Replace every quantisable nn.Linear (the tied lm_head too, untied from the bf16 input embedding) by Int4Linear, in place.

    `kernel` picks Int4Linear's compute path (None: `default_kernel` for the model's device).
    With "tinygemm+triton" the head gets tinygemm alone: phikit's paths only ever ask it for the
    last position's logits (M=1), so a prefill copy of its 200k rows would be dead weight.
    """
    head = model.get_output_embeddings()
    for parent, name, lin in _linears(model, include_lm_head):
        if can_quantize(lin, group_size):
            k = kernel or default_kernel(lin.weight.device)
            if k == "tinygemm+triton" and lin is head:
                k = "tinygemm"
            setattr(parent, name, Int4Linear(lin.weight, lin.bias, group_size, k))
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
