"""The LM head and the cross-entropy in chunks of rows, with the gradient taken during the forward, so the
[tokens, vocabulary] logits never exist whole (Phi-4-mini: 4,096 tokens x 200k x fp32 = 3.3 GB).

Liger and cut-cross-entropy do the same in Triton; this is written in torch because the head is frozen
under LoRA (only the input needs a gradient, which makes it a few lines), and so it runs, and is tested,
on the CPU too. `ChunkedCE` is what step.lm_loss takes as its `head_ce`.
"""

from __future__ import annotations

import torch

from .compiled import Compiled

CE_CHUNK_BYTES = 1 << 28  # fp32 logits alive at a time in linear_cross_entropy (256 MB: 327 rows of a 200k vocabulary)


class _LinearCE(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, target); the gradient w.r.t. hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, ce):
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], target[s : s + chunk]
            loss, dlogits = ce(h @ weight.t(), t, grad is not None)
            total += loss
            if grad is not None:
                grad[s : s + chunk] = (dlogits @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def ce_chunk(logits: torch.Tensor, target: torch.Tensor, with_grad: bool):
    """(summed cross-entropy, its gradient w.r.t. the logits in their dtype, or None) of one chunk, in fp32
    at least (bf16 logits are summed in fp32). d(loss)/d(logits) = softmax - onehot."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, target[:, None])[:, 0]).sum()
    if not with_grad:
        return loss, None
    cols = torch.arange(x.shape[1], device=x.device)
    p = torch.exp(x - lse[:, None])
    return loss, torch.where(cols[None, :] == target[:, None], p - 1, p).to(logits.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None,
                         ce=ce_chunk) -> torch.Tensor:
    """Summed cross-entropy of the linear head `weight` ([vocab, d], frozen) over `hidden` ([n, d]) against `target` ([n]).

    Equal to F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="sum"), with
    at most `chunk` rows of logits alive at a time (default: CE_CHUNK_BYTES of fp32 logits).
    The head gets no gradient: under LoRA it is frozen. `ce`: the per-chunk function (ce_chunk, or it compiled).
    """
    chunk = chunk or max(16, CE_CHUNK_BYTES // (4 * weight.shape[0]))
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the head weight; freeze it or use F.cross_entropy")
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return _LinearCE.apply(hidden, weight.detach(), target, chunk, ce)


class ChunkedCE:
    """linear_cross_entropy as step.lm_loss's `head_ce`. On CUDA each chunk runs compiled (made on the first
    CUDA call, dynamic shapes: the last chunk is shorter): one reduction and one element-wise pass over the
    bf16 logits, where eagerly it is ~6 passes over fp32 copies."""

    def __init__(self):
        self.compiled: Compiled | None = None

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        ce = ce_chunk
        if hidden.is_cuda:
            if self.compiled is None:
                self.compiled = Compiled(ce_chunk, dynamic=True)
            ce = self.compiled
        return linear_cross_entropy(hidden, weight, target, chunk, ce)
