"""The trainable (LoRA) weights and their gradients as views into one buffer each, so the optimizer steps
one tensor instead of hundreds."""

from __future__ import annotations

import torch


def flat_parameters(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """One contiguous buffer per (dtype, device) behind `params`: each parameter's data and grad become
    views into it. Returns the flat parameters, to give the optimizer (and the gradient clipping).

    Why: bitsandbytes' 8-bit AdamW runs its kernel, with Python around it, once per tensor (Phi-4-mini
    has 256 LoRA tensors); one flat tensor is one launch. torch's AdamW is elementwise, so its result is
    the same either way; the 8-bit states are quantised in blocks of 256 values, which LoRA tensors
    (r x d, d a multiple of 16) fill exactly.

    The gradients must be zeroed in place from then on (`optimizer.zero_grad(set_to_none=False)`):
    autograd accumulates into an existing .grad, but replaces a missing one with a tensor of its own,
    which would cut it loose from the buffer.
    """
    groups: dict = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    flats = []
    for (dtype, device), ps in groups.items():
        flat = torch.empty(sum(p.numel() for p in ps), dtype=dtype, device=device)
        grad = torch.zeros_like(flat)
        at = 0
        for p in ps:
            n = p.numel()
            flat[at : at + n].copy_(p.detach().reshape(-1))
            p.data = flat[at : at + n].view_as(p)
            p.grad = grad[at : at + n].view_as(p)
            at += n
        fp = torch.nn.Parameter(flat)
        fp.grad = grad
        flats.append(fp)
    return flats
