"""Attention for the batch-1 decode step over a static KV cache (the CUDA fast path's decode graph).

Why our own: under torch.compile, transformers' SDPA path for a single query
with an explicit mask first expands the 8 key/value heads to the 24 query
heads (`repeat_kv`: two 3 MB copies per layer at 512 cache slots), then runs
SDPA's memory-efficient kernel on 24 one-row problems, and it reads every
slot of the static cache, filled or not. Here one Triton program per
key/value head reads that head's keys and values once for all the query
heads that share it (grouped-query attention as a [G, D] x [D, S] product),
and, given the step's position, walks the cache only up to it, so it reads
only the filled part whatever the cache's length (with a mask it reads all).

`torch.ops.phikit.decode_attention(q, k, v, mask, position, scale)`:
  q        [1, Hq, 1, D]   the step's query (after rope)
  k, v     [1, Hkv, S, D]  the whole static cache of the layer
  mask     [1, 1, 1, S]    bool, True where the slot takes part (transformers' sdpa mask), or None
  position [1, 1]          the query's position, or None: slots 0..position take part
returns [1, 1, Hq, D], the layout transformers' attention functions return.

`attention_forward` is the function registered with transformers'
AttentionInterface as "phikit_decode" (with SDPA's mask function). It takes a
single query of batch 1 with SDPA's boolean mask and hands everything else
(prefill chunks, batches, float masks) to transformers' SDPA function.

Contract: "phikit_decode" is for `StaticDecoder`'s decode step, which calls
the model with neither an attention mask nor position ids. There the mask is
exactly "slot <= position" (slot i of the static cache holds position i), so
the kernel takes the position (one number, passed to every layer) instead of
the mask. This is not only a saving of mask reads: compiled, the [1, 1, 1, S]
mask was rebuilt by a separate kernel before each layer's attention (1 µs per
layer). Do not run it with a padding mask or shifted positions.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "phikit_decode"  # the attention implementation name the fast path's decode graph runs under
_HAS_TRITON = False  # set by register(): whether torch.ops.phikit.decode_attention exists


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                               position: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in plain torch (fp32 softmax), for CPU and as the kernel's test reference."""
    hq, d = q.shape[1], q.shape[-1]
    hkv = k.shape[1]
    if position is not None:
        mask = torch.arange(k.shape[2], device=k.device) <= position.reshape(())
    qg = q.reshape(hkv, hq // hkv, d).float()
    s = qg @ k[0].float().transpose(1, 2) * scale  # [Hkv, G, S]
    s = s.masked_fill(~mask.reshape(1, 1, -1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ v[0].float()).to(q.dtype).reshape(1, 1, hq, d)


def _supported(query, key, mask) -> bool:
    return (query.shape[0] == 1 and query.shape[2] == 1 and mask is not None and mask.dtype == torch.bool
            and mask.dim() == 4 and mask.shape[0] == 1 and mask.shape[1] == 1 and mask.shape[2] == 1
            and mask.shape[-1] == key.shape[2] and query.shape[1] % key.shape[1] == 0)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention-interface function: our decode attention for one query, SDPA otherwise."""
    if dropout or not _supported(query, key, attention_mask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.numel() == 1:  # see the contract in the module docstring
        mask = None
    else:
        mask, pos = attention_mask, None
    if query.is_cuda and _HAS_TRITON:
        out = torch.ops.phikit.decode_attention(query, key, value, mask, pos, float(scale))
    else:
        out = decode_attention_reference(query, key, value, mask, scale, position=pos)
    return out, None


SLOTS_NAME = "phikit_slots"  # the attention implementation of the batched slot cache (backends/slot_batch.py)


def slot_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, start: torch.Tensor,
                   scale: float, span: int) -> torch.Tensor:
    """Attention of R rows of C queries, each over its own slot of a slot cache, causally from its position.

      q       [R, Hq, C, D]      the rows' queries (after rope); query j of row r is at position start[r] + j
      keys    [slots, L, Hkv, D] the layer's slot cache (values alike); row r reads slot[r], positions 0..its own
      span    how many positions of a slot to look at (>= every query's position + 1; L in a captured step)
    returns [R, C, Hq, D], the layout transformers' attention functions return.

    One query per row on CUDA with triton: `torch.ops.phikit.slot_decode_attention` (the cache is read in
    place, each row only up to its position). Otherwise the rows' slots are gathered and SDPA runs with a
    causal mask per row (prompt slices, CPU).
    """
    r, hq, c, d = q.shape
    if c == 1 and q.is_cuda and _HAS_TRITON:
        return torch.ops.phikit.slot_decode_attention(q, keys, values, slot, start, float(scale))
    k = keys[slot, :span].transpose(1, 2)  # [R, Hkv, span, D]
    v = values[slot, :span].transpose(1, 2)
    qpos = start[:, None] + torch.arange(c, device=q.device)[None]  # [R, C]
    mask = torch.arange(span, device=q.device)[None, None, :] <= qpos[:, :, None]  # [R, C, span]
    with _no_cudnn() if q.is_cuda else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None],
                                                               scale=scale, enable_gqa=k.shape[1] != hq)
    return out.transpose(1, 2)


@torch.library.custom_op("phikit::slot_write_attention", mutates_args=("keys", "values"))
def slot_write_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         where: torch.Tensor, slot: torch.Tensor, start: torch.Tensor, scale: float, span: int) -> torch.Tensor:
    """A layer's step over a slot cache: the rows' new keys and values k, v [R * C, Hkv, D] written into `keys` and
    `values` [slots, L, Hkv, D] at the flattened cache positions `where` [R * C] (slot * L + position), then
    `slot_attention` of q [R, Hq, C, D]; -> [R, C, Hq, D], contiguous.

    One operator that writes the cache in place, rather than `index_copy_` into a view of the cache followed by the
    attention: under torch.compile (torch 2.11) that pair was functionalised into a fresh copy of the whole cache
    per layer, handed to the attention kernel (an opaque operator needs a tensor, not the pending write): the
    compiled decode step took 52 ms on the H100 whatever the batch. A custom operator that declares its mutation
    is kept in place on the cache (the graph's input)."""
    keys.view(-1, *keys.shape[2:]).index_copy_(0, where, k)
    values.view(-1, *values.shape[2:]).index_copy_(0, where, v)
    return slot_attention(q, keys, values, slot, start, scale, span).contiguous()


@slot_write_attention.register_fake
def _(q, k, v, keys, values, where, slot, start, scale, span):
    r, hq, c, d = q.shape
    return q.new_empty((r, c, hq, d))


def _no_cudnn():
    """SDPA without its cuDNN backend: cuDNN builds an execution plan for every new shape (prompt slices come in
    many), where the memory-efficient kernel takes any shape and a boolean mask as it is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def slot_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                           phikit_kv=None, **kwargs):
    """transformers attention-interface function "phikit_slots": the slot cache passed to the model call as
    `phikit_kv` (a SlotKV) writes this layer's keys and values and attends; without one, SDPA."""
    if phikit_kv is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return phikit_kv.attend(module.layer_idx, query, key, value, scale), None


def register_slots() -> str:
    """Register "phikit_slots" with transformers (no mask function: the model calls pass a 4D placeholder mask,
    which transformers hands through untouched); returns the name."""
    register()
    from transformers import AttentionInterface

    AttentionInterface.register(SLOTS_NAME, slot_attention_forward)
    return SLOTS_NAME


def register() -> str:
    """Register "phikit_decode" with transformers (attention function and its mask: SDPA's); returns the name.

    Also imports the Triton kernel (registering torch.ops.phikit.decode_attention) where triton is
    installed, before any trace: the attention function itself must not import under torch.compile.
    """
    global _HAS_TRITON
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    try:
        from . import decode_attention_triton  # noqa: F401
        _HAS_TRITON = True
    except ImportError:
        _HAS_TRITON = False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
