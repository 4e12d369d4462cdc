"""The training fast path: what lets a QLoRA step run in a few GB and fast.

Two pieces, each small enough to read in one sitting:

- `linear_cross_entropy`: the LM head and the cross-entropy in chunks of rows,
  with the gradient taken during the forward, so the [tokens, vocabulary]
  logits never exist whole (Phi-4-mini: 4,096 tokens x 200k x fp32 = 3.3 GB).
  Liger and cut-cross-entropy do the same in Triton; this is written in torch
  because the head is frozen under LoRA (only the input needs a gradient,
  which makes it a few lines), and so it runs, and is tested, on the CPU too.
- `offload_checkpointing`: each decoder layer keeps only its input for the
  backward pass (activation checkpointing), and that input waits in pinned CPU
  memory instead of on the GPU, copied on a side stream while the next layers
  compute and fetched back one layer ahead of the backward pass. This is what
  makes 100k+ token sequences fit: the GPU then holds one layer's activations
  at a time. torch.utils.checkpoint keeps every layer's input on the GPU.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

CE_CHUNK_BYTES = 1 << 28  # fp32 logits alive at a time in linear_cross_entropy (256 MB: 327 rows of a 200k vocabulary)


class _LinearCE(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, target); the gradient w.r.t. hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are summed in fp32
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], target[s : s + chunk]
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if grad is not None:
                # d(loss)/d(logits) = softmax - onehot, computed in place on the chunk's logits
                logits.sub_(lse[:, None]).exp_()
                logits[torch.arange(len(t), device=t.device), t] -= 1
                grad[s : s + chunk] = (logits.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the linear head `weight` ([vocab, d], frozen) over `hidden` ([n, d]) against `target` ([n]).

    Equal to F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="sum"), with
    at most `chunk` rows of logits alive at a time (default: CE_CHUNK_BYTES of fp32 logits).
    The head gets no gradient: under LoRA it is frozen.
    """
    chunk = chunk or max(16, CE_CHUNK_BYTES // (4 * weight.shape[0]))
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the head weight; freeze it or use F.cross_entropy")
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return _LinearCE.apply(hidden, weight.detach(), target, chunk)


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


def _capture(x: torch.Tensor) -> tuple:
    """What a recompute needs to replay a forward exactly: the RNG states (dropout masks) and autocast."""
    dev = x.device
    return (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if x.is_cuda else None,
            torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))


@contextlib.contextmanager
def _replay(state: tuple, x: torch.Tensor):
    """Within: the captured RNG states and autocast, with grad on; the caller's RNG is restored after."""
    rng_cpu, rng_dev, enabled, dtype = state
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.set_rng_state(rng_cpu)
        if rng_dev is not None:
            torch.cuda.set_rng_state(rng_dev, x.device)
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            yield


class _OffloadedLayer(torch.autograd.Function):
    """Run `fn(x)` without keeping its activations; in backward, recompute it from the parked x."""

    @staticmethod
    def forward(ctx, fn, offload, x):
        ctx.fn, ctx.offload, ctx.state = fn, offload, _capture(x)
        ctx.entry = offload.park(x.detach())
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.offload.take(ctx.entry).detach().requires_grad_(True)
        with _replay(ctx.state, x):  # the recompute draws the same dropout masks
            out = ctx.fn(x)
        torch.autograd.backward(out, grad_out)
        return None, None, x.grad


class _TiledMLP(torch.autograd.Function):
    """A token-wise `fn` over `x` in chunks of rows: only one chunk's activations exist at a time.

    The backward pass runs `fn` again chunk by chunk (same RNG, same chunks, so the same dropout
    masks) and back-propagates each chunk at once. At 131k tokens Phi-4-mini's MLP holds
    ~13 GB of activations per layer; tiled in 8k-token chunks, under 1 GB. It costs one more
    MLP forward, so it is used only for long sequences.
    """

    @staticmethod
    def forward(ctx, fn, x, rows):
        ctx.fn, ctx.rows, ctx.state = fn, rows, _capture(x)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(c) for c in x.split(rows, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        with _replay(ctx.state, x):  # the chunks in the forward's order, so the forward's dropout masks
            for c, g, gx in zip(x.split(ctx.rows, dim=-2), grad_out.split(ctx.rows, dim=-2), grad_x.split(ctx.rows, dim=-2)):
                c = c.detach().requires_grad_(True)
                torch.autograd.backward(ctx.fn(c), g)
                gx.copy_(c.grad)
        return None, grad_x, None


def tile_mlp(mlp: torch.nn.Module, min_tokens: int = 32768, rows: int = 8192) -> None:
    """Run `mlp` (token-wise, input [batch, seq, d]) in chunks of `rows` positions once a batch has `min_tokens` (in place)."""
    plain = mlp.forward

    def forward(x, *args, **kwargs):
        if x.dim() != 3 or x.shape[0] * x.shape[1] < min_tokens or args or kwargs:
            return plain(x, *args, **kwargs)
        if torch.is_grad_enabled() and mlp.training:
            return _TiledMLP.apply(plain, x, rows)
        return torch.cat([plain(c) for c in x.split(rows, dim=-2)], dim=-2)

    mlp.forward = forward


def offload_checkpointing(layers, compile: bool = False) -> None:
    """Checkpoint each decoder layer in `layers` with its input offloaded to pinned CPU memory (in place);
    the layers' MLPs run tiled for long sequences (tile_mlp); `compile`: each layer runs through
    torch.compile, one compiled region shared by all the layers (they are the same code).

    A layer's forward must take the hidden states first and return a tensor
    (transformers 5 decoder layers do). In eval mode, or without grad, the
    layer runs as before. One process only: the recompute's gradients are
    accumulated inside the backward call, which DDP's hooks do not expect.
    """
    import functools

    layers = list(layers)
    if not layers:
        return
    dev = next(layers[0].parameters()).device
    offload = _Offload(dev)
    compiled = _Compiled(type(layers[0]).forward) if compile else None
    for layer in layers:
        if isinstance(getattr(layer, "mlp", None), torch.nn.Module):
            tile_mlp(layer.mlp)
        plain = layer.forward
        run = functools.partial(compiled, layer, _eager=plain) if compiled else plain

        def forward(hidden_states, *args, _plain=plain, _run=run, _layer=layer, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _plain(hidden_states, *args, **kwargs)
            if not hidden_states.requires_grad:  # the frozen embedding's output: the LoRA weights inside still need the graph
                hidden_states = hidden_states.detach().requires_grad_(True)
            return _OffloadedLayer.apply(lambda h: _run(h, *args, **kwargs), offload, hidden_states)

        layer.forward = forward


class _Compiled:
    """torch.compile of a layer class's forward, shared by every layer of that class; if the first
    compile fails (an op torch.compile cannot take), a warning and eager from then on."""

    made: list = []  # every instance, so a caller (the benchmark) can report whether compiling took

    def __init__(self, fn):
        self.fn = torch.compile(fn)
        self.failed = None
        _Compiled.made.append(self)

    def __call__(self, layer, *args, _eager, **kwargs):
        if self.failed is None:
            try:
                out = self.fn(layer, *args, **kwargs)
                self.failed = False
                return out
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # the compiler's own errors vary by backend; any of them means: run eagerly
                import logging

                logging.getLogger("phikit").warning("torch.compile could not take %s (%s: %s); training eagerly",
                                                    type(layer).__name__, type(e).__name__, str(e).splitlines()[0][:200])
                self.failed = True
        if self.failed:
            return _eager(*args, **kwargs)
        return self.fn(layer, *args, **kwargs)
