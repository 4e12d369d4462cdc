"""Offloaded activation checkpointing: each decoder layer keeps only its input for the backward pass, and
that input waits in pinned CPU memory instead of on the GPU, copied on a side stream while the next layers
compute and fetched back one layer ahead of the backward pass. Why: the GPU then holds one layer's
activations at a time, which is what makes 100k+ token sequences fit (torch.utils.checkpoint keeps every
layer's input on the GPU). `offload_checkpointing` also puts the layers through one compiled region, with
their NF4 layers (nf4.py) and LoRA layers (fast_lora.py) made for it, and tiles their MLPs (tiled_mlp.py).
"""

from __future__ import annotations

import functools
import weakref

import torch

from .compiled import Compiled
from .fast_lora import fast_lora
from .hashed_dropout import DropoutSeed
from .nf4 import compile_nf4
from .recompute import capture, replay
from .tiled_mlp import tile_mlp


class _Parked(dict):
    """One parked layer input ("cpu" while parked, "gpu" once fetched); a dict that can be weakly referenced."""

    __slots__ = ("__weakref__",)


class _Offload:
    """Layer inputs parked in pinned CPU memory: copied out on a side stream, fetched back one layer ahead."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # In forward order; the backward pass walks it from the end. Weak references, so a graph
        # that is dropped without a backward pass (an exception, a stopped step) frees its inputs.
        self.parked: list[weakref.ref] = []

    def park(self, x: torch.Tensor) -> _Parked:
        entry = _Parked()
        if self.stream is None:  # CPU: nothing to offload, keep the tensor
            entry["gpu"] = x
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                cpu = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                cpu.copy_(x, non_blocking=True)
            x.record_stream(self.stream)  # the allocator must not reuse x before the copy has read it
            entry["cpu"] = cpu
        self.parked = [r for r in self.parked if r() is not None]
        self.parked.append(weakref.ref(entry))
        return entry

    def _fetch(self, entry: _Parked | None) -> None:
        if entry is None or "gpu" in entry or "cpu" not in entry:
            return
        with torch.cuda.stream(self.stream):
            entry["gpu"] = entry.pop("cpu").to(self.device, non_blocking=True)
            entry["ready"] = torch.cuda.Event()
            entry["ready"].record(self.stream)

    def take(self, entry: _Parked) -> torch.Tensor:
        """The parked tensor back on the device; starts fetching the one parked before it."""
        self._fetch(entry)
        i = next((k for k in range(len(self.parked) - 1, -1, -1) if self.parked[k]() is entry), None)
        if i is not None:
            del self.parked[i]
            if i > 0 and self.stream is not None:
                self._fetch(self.parked[i - 1]())
        x = entry.pop("gpu")
        if "ready" in entry:
            torch.cuda.current_stream(self.device).wait_event(entry["ready"])
            x.record_stream(torch.cuda.current_stream(self.device))
        return x


class _OffloadedLayer(torch.autograd.Function):
    """Run `fn(x)` without keeping its activations; in backward, recompute it from the parked x.
    `anchor`: a tensor that requires grad, so the backward runs (for the weights inside `fn`) also where x does not."""

    @staticmethod
    def forward(ctx, fn, offload, x, anchor):
        ctx.fn, ctx.offload, ctx.state = fn, offload, capture(x)
        ctx.entry = offload.park(x.detach())
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad_out):
        # x's gradient is taken even where the caller needs none (the first layer's): one more graph to compile
        # otherwise, for one layer's input gradient.
        x = ctx.offload.take(ctx.entry).detach().requires_grad_(True)
        with replay(ctx.state, x):  # the recompute draws the same dropout masks
            out = ctx.fn(x)
        torch.autograd.backward(out, grad_out)
        return None, None, x.grad if ctx.needs_input_grad[2] else None, None


# What the first layer's Function hangs its backward on: the frozen embedding's output needs no gradient, and
# making it a leaf that does would keep it alive (in its AccumulateGrad node) until the backward ends.
_ANCHOR = torch.empty(0, requires_grad=True)


def offload_checkpointing(layers, compile: bool = False, nf4: bool = True, lora: bool = True, tile: bool = True,
                          fp8: bool = False, fuse: bool = True) -> Compiled | None:
    """Checkpoint each decoder layer in `layers` with its input offloaded to pinned CPU memory (in place);
    `tile`: the layers' MLPs run tiled for long sequences (tile_mlp); `compile`: each layer runs through
    torch.compile, one compiled region shared by all the layers (they are the same code), with
    compile_nf4 (`nf4`; its products in FP8 with `fp8`, sibling projections' in one with `fuse`) and
    fast_lora (`lora`) applied to it. Returns that compiled region, or None.

    A layer's forward must take the hidden states first and return a tensor
    (transformers 5 decoder layers do). In eval mode, or without grad, the
    layer runs as before. One process only: the recompute's gradients are
    accumulated inside the backward call, which DDP's hooks do not expect.
    """
    layers = list(layers)
    if not layers:
        return None
    dev = next(layers[0].parameters()).device
    offload = _Offload(dev)
    # fallback_random: dropout in the compiled layers draws from torch's own generator, as eager does. Inductor's
    # own random numbers differ between the no-grad forward graph and the recompute's training graph, so the
    # recompute would draw other masks than the forward and the gradient would not be the loss's (tested).
    compiled = Compiled(type(layers[0]).forward, options={"fallback_random": True}) if compile else None
    shared_seed = DropoutSeed(dev)  # fast_lora's, one for all layers (see DropoutSeed)
    for layer in layers:
        if compile and nf4:
            compile_nf4(layer, fp8=fp8, fuse=fuse)
        if (compile and lora) or any(getattr(type(m), "_phikit_fast_lora", False) for m in layer.modules()):  # or the caller's
            fast_lora(layer, shared_seed)
            seed = shared_seed
        else:
            seed = None
        if tile and isinstance(getattr(layer, "mlp", None), torch.nn.Module):
            tile_mlp(layer.mlp, seed=seed)
        plain = layer.forward
        run = functools.partial(compiled, layer) if compiled else plain  # compiled: the class's forward, as is

        def forward(hidden_states, *args, _plain=plain, _run=run, _layer=layer, _seed=seed, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                if _seed is not None and _layer.training:  # dropout on without grad: the masks a training forward draws
                    _seed.redraw()
                return _plain(hidden_states, *args, **kwargs)

            def fn(h):
                if _seed is not None:
                    _seed.redraw()
                return _run(h, *args, **kwargs)

            return _OffloadedLayer.apply(fn, offload, hidden_states, _ANCHOR)

        layer.forward = forward
    return compiled
