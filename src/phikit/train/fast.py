"""The training fast path: what lets a QLoRA step run in a few GB and fast.

The pieces, each small enough to read in one sitting:

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
- `flat_parameters`: the trainable (LoRA) weights and their gradients as views
  into one buffer each, so the optimizer steps one tensor instead of hundreds.
- `compile_nf4`: inside a compiled layer, bitsandbytes' NF4 linear layers
  dequantise with torch ops instead of bitsandbytes' calls.
- `fast_lora`: peft's LoRA layers in a compiled layer scale the rank-r product
  instead of the full output, and draw their dropout masks from a hash the
  compiler fuses (`hash_dropout`), so the backward keeps neither a scaled copy
  of each output gradient nor the dropout's outputs and masks.
- `adamw8bit`: bitsandbytes' 8-bit AdamW without its device-wide synchronise
  after each tensor.
- `host_embedding`: a frozen input embedding that the LM head does not share
  waits in pinned CPU memory, where the GPU reads the rows it needs.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

CE_CHUNK_BYTES = 1 << 28  # fp32 logits alive at a time in linear_cross_entropy (256 MB: 327 rows of a 200k vocabulary)


class _LinearCE(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, target); the gradient w.r.t. hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        # On CUDA the chunk compiles into a reduction and one element-wise pass over the bf16 logits; eagerly it is
        # ~6 passes over fp32 copies (~15 ms a Phi-4-mini step).
        ce = _compiled_dynamic(_ce_chunk) if hidden.is_cuda else _ce_chunk
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
        return grad * grad_out.to(grad.dtype), None, None, None


def _ce_chunk(logits: torch.Tensor, target: torch.Tensor, with_grad: bool):
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


@functools.cache
def _compiled_dynamic(fn) -> "_Compiled":
    """`fn` compiled once for every shape (dynamic: chunks and inputs vary in length), shared by its callers."""
    return _Compiled(fn, dynamic=True)


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
    """Run `fn(x)` without keeping its activations; in backward, recompute it from the parked x.
    `anchor`: a tensor that requires grad, so the backward runs (for the weights inside `fn`) also where x does not."""

    @staticmethod
    def forward(ctx, fn, offload, x, anchor):
        ctx.fn, ctx.offload, ctx.state = fn, offload, _capture(x)
        ctx.entry = offload.park(x.detach())
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad_out):
        # x's gradient is taken even where the caller needs none (the first layer's): one more graph to compile
        # otherwise, for one layer's input gradient.
        x = ctx.offload.take(ctx.entry).detach().requires_grad_(True)
        with _replay(ctx.state, x):  # the recompute draws the same dropout masks
            out = ctx.fn(x)
        torch.autograd.backward(out, grad_out)
        return None, None, x.grad if ctx.needs_input_grad[2] else None, None


# What the first layer's Function hangs its backward on: the frozen embedding's output needs no gradient, and
# making it a leaf that does would keep it alive (in its AccumulateGrad node) until the backward ends.
_ANCHOR = torch.empty(0, requires_grad=True)


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
        with _replay(ctx.state, x), _chunked():  # the chunks in the forward's order, so the forward's dropout masks
            for c, g, gx in zip(x.split(ctx.rows, dim=-2), grad_out.split(ctx.rows, dim=-2), grad_x.split(ctx.rows, dim=-2)):
                c = c.detach().requires_grad_(True)
                torch.autograd.backward(ctx.fn(c), g)
                gx.copy_(c.grad)
        return None, grad_x, None


_CHUNKED = False  # True while tile_mlp runs an MLP chunk by chunk: its LoRA dropout then draws a seed per chunk


@contextlib.contextmanager
def _chunked():
    global _CHUNKED
    before, _CHUNKED = _CHUNKED, True
    try:
        yield
    finally:
        _CHUNKED = before


def tile_mlp(mlp: torch.nn.Module, min_tokens: int = 32768, rows: int = 8192) -> None:
    """Run `mlp` (token-wise, input [batch, seq, d]) in chunks of `rows` positions once a batch has `min_tokens` (in place)."""
    plain = mlp.forward

    # Outside torch.compile (a compiled layer breaks its graph here, for long sequences only): with the tiled
    # MLP inside a compiled layer, the finite-difference check of the replayed dropout masks failed on
    # torch 2.11 (it passes on 2.13); run eagerly it passes on both.
    @torch.compiler.disable
    def tiled(x):
        with _chunked():
            if torch.is_grad_enabled() and mlp.training:
                return _TiledMLP.apply(plain, x, rows)
            return torch.cat([plain(c) for c in x.split(rows, dim=-2)], dim=-2)

    def forward(x, *args, **kwargs):
        if x.dim() != 3 or x.shape[0] * x.shape[1] < min_tokens or args or kwargs:
            return plain(x, *args, **kwargs)
        return tiled(x)

    mlp.forward = forward


def offload_checkpointing(layers, compile: bool = False) -> None:
    """Checkpoint each decoder layer in `layers` with its input offloaded to pinned CPU memory (in place);
    the layers' MLPs run tiled for long sequences (tile_mlp); `compile`: each layer runs through
    torch.compile, one compiled region shared by all the layers (they are the same code), with
    compile_nf4 and fast_lora applied to it.

    A layer's forward must take the hidden states first and return a tensor
    (transformers 5 decoder layers do). In eval mode, or without grad, the
    layer runs as before. One process only: the recompute's gradients are
    accumulated inside the backward call, which DDP's hooks do not expect.
    """
    layers = list(layers)
    if not layers:
        return
    dev = next(layers[0].parameters()).device
    offload = _Offload(dev)
    # fallback_random: dropout in the compiled layers draws from torch's own generator, as eager does. Inductor's
    # own random numbers differ between the no-grad forward graph and the recompute's training graph, so the
    # recompute would draw other masks than the forward and the gradient would not be the loss's (tested).
    compiled = _Compiled(type(layers[0]).forward, options={"fallback_random": True}) if compile else None
    # fast_lora's dropout seed, one for all layers: drawn at the start of each layer's forward and again, from the
    # replayed generator state, at the start of its recompute (one eager draw per layer instead of one per projection).
    shared_seed = torch.zeros(1, dtype=torch.int64, device=dev)
    for layer in layers:
        if compile and COMPILE_NF4:
            compile_nf4(layer)
        if compile or any(getattr(type(m), "_phikit_fast_lora", False) for m in layer.modules()):  # or the caller's
            fast_lora(layer, shared_seed)
            seed = shared_seed
        else:
            seed = None
        if isinstance(getattr(layer, "mlp", None), torch.nn.Module):
            tile_mlp(layer.mlp)
        plain = layer.forward
        run = functools.partial(compiled, layer) if compiled else plain  # compiled: the class's forward, as is

        def forward(hidden_states, *args, _plain=plain, _run=run, _layer=layer, _seed=seed, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                if _seed is not None and _layer.training:  # dropout on without grad: the masks a training forward draws
                    _seed.random_(0, 1 << 31)
                return _plain(hidden_states, *args, **kwargs)

            def fn(h):
                if _seed is not None:
                    _seed.random_(0, 1 << 31)
                return _run(h, *args, **kwargs)

            return _OffloadedLayer.apply(fn, offload, hidden_states, _ANCHOR)

        layer.forward = forward


COMPILE_NF4 = True  # offload_checkpointing(compile=True) applies compile_nf4 (the benchmark turns it off to compare)


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


def hash_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None = None, site: int = 0) -> torch.Tensor:
    """Dropout whose mask is a hash of a seed, a `site` number and the position. The seed (a one-element int64
    tensor) is drawn from torch's generator unless given, so a recompute that replays the generator's state,
    as the checkpointing here does, draws the same mask.

    Why not torch's dropout: inside a compiled layer it runs as an eager kernel (the compiler's own random
    numbers differ between the no-grad forward and the recompute; see offload_checkpointing), which writes the
    dropped tensor and a mask that the backward then keeps. Before this, dropout 0.05 cost 3% of a Phi-4-mini
    step and 0.08 GiB at phi-4's peak against dropout 0 (H100). The hash costs a few integer operations inside
    a kernel that runs anyway."""
    if p == 0:
        return x
    if seed is None:
        seed = torch.randint(1 << 31, (1,), device=x.device)
    # Outside a compiled layer on CUDA (a tiled MLP, or a layer the compiler could not take): compiled on its
    # own, one kernel instead of ~15.
    if torch.compiler.is_compiling() or not x.is_cuda:
        return _hash_dropout(x, seed, p, site)
    return _compiled_dynamic(_dropped)(x, seed, *_rate(p), site)


def fast_lora(module: torch.nn.Module, seed: torch.Tensor | None = None) -> int:
    """peft's LoRA linear layers in `module` run the plain LoRA forward below (in place; returns how many).
    `seed`: a one-element int64 tensor their dropout hashes (each layer its own site), which the caller
    redraws before each forward; without it (or in a tiled MLP's chunks) each call draws its own.

    result = base(x) + B(A(dropout(x)) * scaling): the scaling multiplies the rank-r product, where peft
    multiplies the full output, and the dropout is `hash_dropout`. Same function; two costs gone in a compiled
    layer. peft's `* scaling` (even by 1.0) makes the backward write a scaled copy of each output gradient (at
    phi-4's gate/up projection, 140 MB at the step's peak), and torch's dropout keeps its outputs and masks.
    Anything but that plain case (merged or disabled adapters, DoRA and other variants, a LoRA bias, mixed
    adapter batches) runs peft's own forward. The class changes, as in compile_nf4, so one compiled graph
    still serves every layer; the dropout masks differ from peft's (another generator), so the stock path's
    masks are not reproduced once this is applied.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    n = site = 0
    for m in module.modules():
        if not (isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)):
            continue
        if not getattr(type(m), "_phikit_fast_lora", False):
            m.__class__ = _fast_lora_class(type(m))
            n += 1
        if seed is not None:  # the same tensor in every layer, as a buffer so torch.compile takes it as an input
            m.register_buffer("phikit_seed", seed, persistent=False)
            m.phikit_site = site
            site += 1
    return n


@functools.cache
def _fast_lora_class(base: type) -> type:
    class FastLora(base):
        _phikit_fast_lora = True

        def _plain(self) -> bool:
            variants, dora = getattr(self, "lora_variant", {}), getattr(self, "use_dora", {})
            return not (self.disable_adapters or self.merged) and all(
                a not in variants and not dora.get(a) and self.lora_B[a].bias is None
                for a in self.active_adapters if a in self.lora_A)

        def forward(self, x, *args, **kwargs):
            if args or kwargs or not self._plain():
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            for a in self.active_adapters:
                if a not in self.lora_A:
                    continue
                lora_A, lora_B, drop = self.lora_A[a], self.lora_B[a], self.lora_dropout[a]
                h = x if torch.is_autocast_enabled() else x.to(lora_A.weight.dtype)  # as peft: its dtype without autocast
                if isinstance(drop, torch.nn.Dropout) and drop.training:
                    seed = None if _CHUNKED else getattr(self, "phikit_seed", None)
                    h = hash_dropout(h, drop.p, seed, getattr(self, "phikit_site", 0))
                result = result + lora_B(lora_A(h) * self.scaling[a]).to(result.dtype)
            return result

    FastLora.__name__ = FastLora.__qualname__ = f"FastLora{base.__name__}"
    return FastLora


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


def compile_nf4(module: torch.nn.Module) -> int:
    """Inside torch.compile, run `module`'s bitsandbytes NF4 linear layers (double-quantised, as phikit loads
    them) through `_nf4_weight` (in place; returns how many). Outside a compile they run as before.

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
            return torch.nn.functional.linear(x, w.to(x.dtype), bias).to(dtype)

    return CompiledNF4Linear


class _Compiled:
    """torch.compile of `fn`; if the first compile fails (an op torch.compile cannot take), a warning and `fn`
    itself from then on. A layer class's forward is compiled once and shared by every layer of that class."""

    made: list = []  # every instance, so a caller (the benchmark) can report whether compiling took

    def __init__(self, fn, **options):
        self.plain, self.fn = fn, torch.compile(fn, **options)
        self.failed = None
        _Compiled.made.append(self)

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                out = self.fn(*args, **kwargs)
                self.failed = False
                return out
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # the compiler's own errors vary by backend; any of them means: run eagerly
                import logging

                logging.getLogger("phikit").warning("torch.compile could not take %s (%s: %s); running it eagerly",
                                                    self.plain.__qualname__, type(e).__name__, str(e).splitlines()[0][:200])
                self.failed = True
        return (self.plain if self.failed else self.fn)(*args, **kwargs)


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


def adamw8bit(params, **kwargs):
    """bitsandbytes' AdamW8bit, less its device-wide synchronise after each tensor's update.

    Its step calls torch.cuda.synchronize() once per parameter (bitsandbytes.utils.sync_gpu), which its paged
    states need. Unpaged, every kernel is ordered on the current stream, and the synchronise only empties the
    GPU's queue: the next step's first layers then wait on the host's launches. The step is bitsandbytes' own
    loop otherwise; paged optimizers keep bitsandbytes' step."""
    return _adamw8bit_class()(params, **kwargs)


@functools.cache
def _adamw8bit_class() -> type:
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit


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
        import logging

        logging.getLogger("phikit").warning("the input embedding stays on the GPU: CUDA does not map pinned memory here (%s)", e)
        return None
    return view
