"""bitsandbytes' NF4 dequantisation in torch ops inside a compiled layer. Why: each bitsandbytes call is a
Python custom op with ~60-80 us of host work, ~600 a Phi-4-mini step, enough to leave the GPU waiting; as
torch ops the dequantisation compiles into the layer's graph at no host cost."""

from __future__ import annotations

import functools

import torch

from .fp8 import fp8_linear, weight_scales


def _nf4_weight(packed, absmax_q, absmax2, code2, offset, code, blocksize: int, blocksize2: int, shape, dtype):
    """bitsandbytes' NF4 dequantisation with double-quantised absmax (dequantize_4bit), in torch ops:
    absmax = code2[absmax_q] * absmax2[block of 256] + offset; w = code[nibble] * absmax[block of 64],
    the high nibble of each byte first, computed in fp32 and rounded once to `dtype`."""
    n_blocks = absmax_q.numel()
    a = torch.nn.functional.pad(code2[absmax_q.long()], (0, -n_blocks % blocksize2))
    absmax = (a.view(-1, blocksize2) * absmax2[:, None]).view(-1)[:n_blocks] + offset
    b = packed.reshape(-1)
    nibbles = torch.stack([b >> 4, b & 15], dim=-1).reshape(-1)
    return (code[nibbles.long()].view(n_blocks, blocksize) * absmax[:, None]).to(dtype).view(shape)


def compile_nf4(module: torch.nn.Module, fp8: bool = False) -> int:
    """Inside torch.compile, run `module`'s bitsandbytes NF4 linear layers (double-quantised, as phikit loads
    them) through `_nf4_weight` (in place; returns how many). Outside a compile they run as before.
    `fp8`: their products run in FP8 there (fp8.py).

    Why: each bitsandbytes call is a Python custom op with ~60-80 µs of host work; Phi-4-mini's QLoRA step
    makes ~600 of them, enough to leave the GPU waiting. As torch ops the dequantisation compiles into the
    layer's graph (one fused kernel per weight) at no host cost. Same arithmetic: tests compare the two.
    The layers change class (a subclass of bitsandbytes' Linear4bit), not per-instance forwards, so every
    layer still shares one compiled graph; the quantisation state's tensors become non-persistent buffers
    (the same tensors, so no memory), which torch.compile takes as graph inputs.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for m in module.modules():
        st = getattr(getattr(m, "weight", None), "quant_state", None)
        if type(m) is not Linear4bit or st is None or not st.nested or st.quant_type != "nf4":
            continue
        for name, t in (("packed", m.weight.data), ("absmax_q", st.absmax), ("absmax2", st.state2.absmax),
                        ("code2", st.state2.code), ("offset", st.offset), ("code", st.code)):
            m.register_buffer(f"nf4_{name}", t, persistent=False)
        m.nf4_meta = (st.blocksize, st.state2.blocksize, tuple(st.shape), st.dtype)
        m.nf4_fp8 = fp8
        if fp8:  # the weight's FP8 scales, from the weight this path dequantises: computed once, as it never changes
            w = _nf4_weight(m.weight.data, st.absmax, st.state2.absmax, st.state2.code, st.offset, st.code, *m.nf4_meta)
            for name, t in zip(("rows", "cols"), weight_scales(w)):
                m.register_buffer(f"fp8_{name}", t, persistent=False)
            del w
        m.__class__ = _nf4_class(Linear4bit)
        n += 1
    return n


@functools.cache
def _nf4_class(base: type) -> type:
    class CompiledNF4Linear(base):
        def forward(self, x):
            if not torch.compiler.is_compiling():
                return super().forward(x)
            dtype = x.dtype
            x = x.to(self.compute_dtype or dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            # The partitioner keeps W in bf16 from the recompute for the backward, which follows it at once:
            # one dequantisation per weight fewer a step (phi-4 on the H100: 10 ms of 384, for 0.43 GiB more at
            # the peak; Phi-4-mini: 0.14 GiB). bitsandbytes' MatMul4Bit dequantises again instead, and so did
            # this path, checkpointed, while the peaks were above the targets.
            w = _nf4_weight(self.nf4_packed, self.nf4_absmax_q, self.nf4_absmax2, self.nf4_code2, self.nf4_offset,
                            self.nf4_code, *self.nf4_meta)
            if self.nf4_fp8:
                return fp8_linear(x, w, bias, (self.fp8_rows, self.fp8_cols)).to(dtype)
            return torch.nn.functional.linear(x, w.to(x.dtype), bias).to(dtype)

    return CompiledNF4Linear
