"""A token-wise MLP run over the sequence in chunks of rows, with a recompute per chunk, once a micro-batch is
long: at 131k tokens Phi-4-mini's MLP holds ~13 GB of activations per layer; tiled in 8k-token chunks, under
1 GB. It costs one more MLP forward, so it is used only for long sequences (offload.py applies it)."""

from __future__ import annotations

import contextlib

import torch

from .hashed_dropout import DropoutSeed
from .recompute import capture, replay


def _chunked(seed: DropoutSeed | None):
    return seed.chunked() if seed is not None else contextlib.nullcontext()


class _TiledMLP(torch.autograd.Function):
    """A token-wise `fn` over `x` in chunks of rows: only one chunk's activations exist at a time.

    The backward pass runs `fn` again chunk by chunk (same RNG, same chunks, so the same dropout
    masks) and back-propagates each chunk at once. At 131k tokens Phi-4-mini's MLP holds
    ~13 GB of activations per layer; tiled in 8k-token chunks, under 1 GB. It costs one more
    MLP forward, so it is used only for long sequences.
    """

    @staticmethod
    def forward(ctx, fn, x, rows, seed):
        ctx.fn, ctx.rows, ctx.state, ctx.seed = fn, rows, capture(x), seed
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(c) for c in x.split(rows, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        with replay(ctx.state, x), _chunked(ctx.seed):  # the chunks in the forward's order, so the forward's dropout masks
            for c, g, gx in zip(x.split(ctx.rows, dim=-2), grad_out.split(ctx.rows, dim=-2), grad_x.split(ctx.rows, dim=-2)):
                c = c.detach().requires_grad_(True)
                torch.autograd.backward(ctx.fn(c), g)
                gx.copy_(c.grad)
        return None, grad_x, None, None


def tile_mlp(mlp: torch.nn.Module, min_tokens: int = 32768, rows: int = 8192, seed: DropoutSeed | None = None) -> None:
    """Run `mlp` (token-wise, input [batch, seq, d]) in chunks of `rows` positions once a batch has `min_tokens` (in place).
    `seed`: the DropoutSeed of its fast_lora layers (default: the one they hold, if any), which draws a seed per
    call while the chunks run."""
    plain = mlp.forward
    seed = seed or next((s for m in mlp.modules() if (s := getattr(m, "phikit_dropout", None)) is not None), None)

    # Outside torch.compile (a compiled layer breaks its graph here, for long sequences only): with the tiled
    # MLP inside a compiled layer, the finite-difference check of the replayed dropout masks failed on
    # torch 2.11 (it passes on 2.13); run eagerly it passes on both.
    @torch.compiler.disable
    def tiled(x):
        with _chunked(seed):
            if torch.is_grad_enabled() and mlp.training:
                return _TiledMLP.apply(plain, x, rows, seed)
            return torch.cat([plain(c) for c in x.split(rows, dim=-2)], dim=-2)

    def forward(x, *args, **kwargs):
        if x.dim() != 3 or x.shape[0] * x.shape[1] < min_tokens or args or kwargs:
            return plain(x, *args, **kwargs)
        return tiled(x)

    mlp.forward = forward
