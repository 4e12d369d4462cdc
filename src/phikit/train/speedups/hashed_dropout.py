"""Dropout whose mask is a hash of a seed and the element's position: a pure function, so inside a compiled
layer it fuses into kernels that run anyway and the backward rebuilds the mask from the seed, where torch's
dropout runs as an eager kernel and the backward keeps its outputs and masks. The seed is drawn from torch's
generator, so a recompute that replays the generator (offload.py) draws the same mask.

`DropoutSeed` is the one seed the LoRA layers of a model hash (fast_lora.py), redrawn per layer call.
"""

from __future__ import annotations

import contextlib

import torch

from .compiled import Compiled


class DropoutSeed:
    """The seed fast_lora's dropouts hash: one int64 tensor for all the layers of a model, redrawn (`redraw`)
    at the start of each layer's forward and again, from the replayed generator state, at the start of its
    recompute (one eager draw per layer instead of one per projection). While a tiled MLP runs chunk by
    chunk (`chunked`), each LoRA call draws its own seed instead, so the chunks' masks are independent."""

    def __init__(self, device):
        self.tensor = torch.zeros(1, dtype=torch.int64, device=device)
        self.per_call = False
        self.compiled: Compiled | None = None  # _dropped, for calls outside a compiled layer on CUDA (made on the first)

    def redraw(self) -> None:
        self.tensor.random_(0, 1 << 31)

    @contextlib.contextmanager
    def chunked(self):
        before, self.per_call = self.per_call, True
        try:
            yield
        finally:
            self.per_call = before


_M32 = 0xFFFFFFFF
_I32_MIN = -(1 << 31)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """Thomas Mueller's 32-bit integer hash (a bijection on [0, 2^32)) on int32 tensors holding the uint32 bit
    patterns: int32 multiplies wrap as uint32 ones do, and the masked arithmetic shift is the logical one.
    In int32 because the GPU emulates each int64 multiply with several 32-bit instructions."""
    h = (((h >> 16) & 0xFFFF) ^ h) * 0x45D9F3B
    h = (((h >> 16) & 0xFFFF) ^ h) * 0x45D9F3B
    return ((h >> 16) & 0xFFFF) ^ h


def _low32(v: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor as an int32 one (the same bits; an exact cast, not an overflowing one)."""
    v = v & _M32
    return (v - ((v >> 31) << 32)).to(torch.int32)


def _hash_dropout(x: torch.Tensor, seed: torch.Tensor, p: float, site: int = 0) -> torch.Tensor:
    """Dropout of `x` at rate `p`, its mask a hash of (`seed`, `site`, the element's position): a pure function,
    so a compiler fuses it into the neighbouring element-wise work and rebuilds it in the backward from the seed.
    The mask keeps position i where mix(mix(i) ^ (seed + site * golden ratio)) >= p * 2^32, as uint32."""
    return _dropped(x, seed, *_rate(p), site)


def _rate(p: float) -> tuple[int, float]:
    """_dropped's (keep_from, scale) for dropout rate `p`."""
    return int(p * 2**32) + _I32_MIN, 1 / (1 - p)


def _dropped(x: torch.Tensor, seed: torch.Tensor, keep_from: int, scale: float, site: int) -> torch.Tensor:
    """_hash_dropout with its threshold (as int32: the uint32 one minus 2^31) worked out by the caller: compiled
    with dynamic shapes, torch.compile (2.13) took int() of a float argument once and kept it for other rates."""
    n = x.numel()
    if n < 2**31:
        i = torch.arange(n, device=x.device, dtype=torch.int32)
    else:  # fold the high bits in
        i = torch.arange(n, device=x.device)
        i = _low32(i ^ (i >> 32))
    h = _mix32(_mix32(i.view(x.shape)) ^ _low32(seed + site * 0x9E3779B9))
    keep = (h ^ _I32_MIN) >= keep_from  # flipping the sign bit orders int32 as uint32
    return torch.where(keep, x.float() * scale, 0).to(x.dtype)


def hash_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None = None, site: int = 0,
                 scope: DropoutSeed | None = None) -> torch.Tensor:
    """Dropout whose mask is a hash of a seed, a `site` number and the position. The seed (a one-element int64
    tensor) is drawn from torch's generator unless given, so a recompute that replays the generator's state,
    as the checkpointing here does, draws the same mask. `scope`: the DropoutSeed whose compiled kernel
    serves calls outside a compiled layer on CUDA (without one they run eagerly).

    Why not torch's dropout: inside a compiled layer it runs as an eager kernel (the compiler's own random
    numbers differ between the no-grad forward and the recompute; see offload.offload_checkpointing), which writes the
    dropped tensor and a mask that the backward then keeps. Before this, dropout 0.05 cost 3% of a Phi-4-mini
    step and 0.08 GiB at phi-4's peak against dropout 0 (H100). The hash costs a few integer operations inside
    a kernel that runs anyway."""
    if p == 0:
        return x
    if seed is None:
        seed = torch.randint(1 << 31, (1,), device=x.device)
    # Outside a compiled layer on CUDA (a tiled MLP, or a layer the compiler could not take): compiled on its
    # own (once for every shape and rate), one kernel instead of ~15.
    if torch.compiler.is_compiling() or not x.is_cuda or scope is None:
        return _hash_dropout(x, seed, p, site)
    if scope.compiled is None:
        scope.compiled = Compiled(_dropped, dynamic=True)
    return scope.compiled(x, seed, *_rate(p), site)
