"""A frozen input embedding that the LM head does not share waits in pinned CPU memory, where the GPU reads
the rows it needs: phi-4's 100k x 5,120 bf16 table is 0.96 GiB of GPU memory; a batch reads 20 MB of it."""

from __future__ import annotations

import logging

import torch


def host_embedding(model: torch.nn.Module) -> int:
    """Move `model`'s input embedding to pinned CPU memory that the GPU reads in place (in place; returns the
    bytes of GPU memory freed), if it is on a GPU, frozen and not the output head's weight too.

    Only the rows of a batch's tokens are read, over PCIe, by the embedding's own gather kernel: 2,048 tokens of
    phi-4 are 20 MB (about 1 ms), against the 1 GB its 100k x 5,120 bf16 table holds on the GPU. Tied embeddings
    (Phi-4-mini's) stay: the head reads the whole table every step. The table stays a CUDA tensor to torch (a
    view of the pinned memory through CUDA's unified addressing), so the model runs unchanged; the pinned
    memory is freed with the model.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    w = getattr(emb, "weight", None)
    if (not isinstance(emb, torch.nn.Embedding) or w is None or not w.is_cuda or w.requires_grad
            or (head is not None and getattr(head, "weight", None) is w) or w.element_size() not in (2, 4)):
        return 0
    host = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
    host.copy_(w.detach())
    view = _device_view(host, w.device)
    if view is None:
        return 0
    emb.weight = torch.nn.Parameter(view, requires_grad=False)
    return host.numel() * host.element_size()


class _HostArray:
    """A pinned CPU tensor presented to torch.as_tensor as CUDA memory (the CUDA array interface): with unified
    addressing, pinned memory has the same address on the GPU. Holds the tensor for as long as the view lives."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": f"<i{t.element_size()}",
                                         "data": (t.data_ptr(), False), "version": 3, "strides": None}


def _device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """`host` (pinned, contiguous) as a tensor on `device` over the same memory, or None where CUDA will not map it."""
    as_int = host.view(torch.int16 if host.element_size() == 2 else torch.int32)
    try:
        view = torch.as_tensor(_HostArray(as_int), device=device).view(host.dtype)
    except (RuntimeError, TypeError, ValueError) as e:
        logging.getLogger("phikit").warning("the input embedding stays on the GPU: CUDA does not map pinned memory here (%s)", e)
        return None
    return view
