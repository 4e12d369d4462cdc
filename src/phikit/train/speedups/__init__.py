"""The training speed-ups: what lets a QLoRA step run in a few GB and fast. One module per technique, each
switched by one field of `SpeedOptions`, which setup builds from the TrainConfig and the device
(`SpeedOptions.for_run`) and benchmarks/speed/train_speed.py builds per variant:

    offload         offload.py         decoder layers checkpointed, their inputs in pinned CPU memory
    compile         compiled.py        each offloaded layer through torch.compile, one region for all
    compile_nf4     nf4.py             NF4 dequantised by torch ops inside that region
    fuse_nf4        nf4.py             there, one product for projections that read one input (q/k/v, gate/up)
    fp8             fp8.py             there, the base's products in FP8 (opt-in)
    fast_lora       fast_lora.py       peft's LoRA layers on a plain forward there, dropout hashed
                    hashed_dropout.py    (the masks a recompute replays from torch's generator)
    tile_mlp        tiled_mlp.py       MLPs over long sequences in chunks of rows
    host_embedding  host_embedding.py  an untied frozen input embedding in pinned CPU memory
    chunked_ce      chunked_ce.py      the LM head and the cross-entropy in chunks, never whole logits
    flat_params     flat_params.py     the LoRA weights and grads in one buffer each
    adamw8bit       adamw8bit.py       bitsandbytes' 8-bit AdamW without its per-tensor synchronise
    cpu_bf16        (here: autocast)   on a CPU, the products in bf16 where it multiplies bf16 natively

Nothing here is module state: `apply` changes one model as the options say and returns what it made
(`Speedups`: the compiled regions, the head's loss), which the caller passes on (step.lm_loss's `head_ce`).
The modules import torch; this one does not, so setup can build options before torch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import PhikitError


@dataclass(frozen=True)
class SpeedOptions:
    """Which speed-ups a run uses. The defaults are all off but the chunked head (a plain eager CPU run)."""

    checkpointing: bool = False  # activation checkpointing (transformers' own, unless offload)
    offload: bool = False  # offload.py (with checkpointing, one process, CUDA)
    compile: bool = False  # the offloaded layers through torch.compile (with offload only)
    compile_nf4: bool = True  # inside compiled layers (nf4.py)
    fuse_nf4: bool = True  # with compile_nf4, not fp8: split projections of one input share a product (nf4.py)
    fp8: bool = False  # with compile_nf4: the NF4 layers' products in FP8 (fp8.py; opt-in, cfg.fp8)
    fast_lora: bool = True  # inside compiled layers (fast_lora.py, hashed_dropout.py)
    tile_mlp: bool = True  # in offloaded layers, from 32k tokens a micro-batch (tiled_mlp.py)
    host_embedding: bool = False  # with offload (host_embedding.py)
    chunked_ce: bool = True  # chunked_ce.py (a frozen bias-free head)
    flat_params: bool = False  # flat_params.py (one process: DDP and FSDP keep their own buffers)
    adamw8bit: bool = False  # adamw8bit.py (CUDA; setup falls back to torch AdamW where bitsandbytes fails)
    cpu_bf16: bool = False  # on the CPU, autocast's bf16 products (`autocast`); CUDA runs under bf16 autocast always

    @classmethod
    def for_run(cls, cfg, device: str, processes: int = 1) -> "SpeedOptions":
        """What `cfg` (a TrainConfig) asks for on `device` with `processes` processes: each None setting on where
        it pays (CUDA, one process). Raises PhikitError for offloading asked for with several processes."""
        cuda = device.startswith("cuda")
        gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda
        offload = gc and (cfg.offload_activations if cfg.offload_activations is not None else cuda and processes == 1)
        if offload and processes > 1:
            raise PhikitError("--offload-activations runs in one process only (its recompute happens inside the backward "
                              "call, where DDP/FSDP do not expect gradients); leave it off with --gpus / torchrun")
        compile = offload and (cfg.compile if cfg.compile is not None else cuda)
        if cfg.fp8 and not compile:
            raise PhikitError("--fp8 runs inside the compiled layers: it needs CUDA, one process, gradient checkpointing "
                              "with offloaded activations and --compile (the defaults on one GPU); leave --fp8 off otherwise")
        cpu_bf16 = not cuda and (cfg.cpu_bf16 if cfg.cpu_bf16 is not None else cpu_multiplies_bf16())
        return cls(checkpointing=gc, offload=offload, compile=compile, fp8=cfg.fp8, host_embedding=offload, flat_params=processes == 1,
                   adamw8bit=cuda and cfg.optimizer in ("auto", "adamw8bit"), cpu_bf16=cpu_bf16)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot products (AVX512_BF16 or AMX), where torch's bf16 matrix products (oneDNN) run
    about twice as fast as fp32 ones: a LoRA step of the embedded 135M model on 2 cores of an AVX-512 BF16 EPYC took
    1.08 s under bf16 autocast against 2.24 s in fp32 (docs/train.md). Without them bf16 is emulated, and slower."""
    import torch

    cpu = getattr(torch, "cpu", None)
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def autocast(device: str, options: SpeedOptions):
    """The context the forward runs in: bf16 autocast on CUDA and, with `options.cpu_bf16`, on the CPU (the LoRA
    weights, the optimizer and the loss stay fp32); else none."""
    import contextlib

    import torch

    if device.startswith("cuda"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if options.cpu_bf16:
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


@dataclass
class Speedups:
    """What `apply` made for one model: the options as applied, the compiled layer region (or None),
    `head_ce` for step.lm_loss (or None: whole logits), the GPU bytes the host embedding freed."""

    options: SpeedOptions
    layers: object = None  # compiled.Compiled of the decoder layers
    head_ce: object = None  # chunked_ce.ChunkedCE
    host_bytes: int = 0

    @property
    def compiled(self) -> list:
        """Every compiled region made so far (the head's is made on its first CUDA call)."""
        ce = getattr(self.head_ce, "compiled", None)
        return [c for c in (self.layers, ce) if c is not None]

    @property
    def compiled_ok(self) -> bool:
        """Something was compiled and nothing fell back to eager."""
        return bool(self.compiled) and not any(c.failed for c in self.compiled)


def apply(model, layers, options: SpeedOptions) -> Speedups:
    """Apply `options` to a peft `model` (in place) whose decoder layers are `layers` (needed for offload);
    returns what was made. The optimizer's side comes after, in setup: `flat_params`, then adamw8bit.py."""
    made = Speedups(options)
    if options.fp8:
        _check_fp8(next(model.parameters()).device)
    if options.offload:
        from .offload import offload_checkpointing

        made.layers = offload_checkpointing(layers, compile=options.compile, nf4=options.compile_nf4,
                                            lora=options.fast_lora, tile=options.tile_mlp, fp8=options.fp8,
                                            fuse=options.fuse_nf4)
        if options.host_embedding:
            from .host_embedding import host_embedding

            made.host_bytes = host_embedding(model)
    if options.chunked_ce:
        from .chunked_ce import ChunkedCE

        made.head_ce = ChunkedCE()
    return made


def _check_fp8(device) -> None:
    """PhikitError unless `device` multiplies FP8 on tensor cores (compute capability 8.9 or above)."""
    import torch

    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise PhikitError(f"--fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: H100, H200, L4, RTX 40xx); "
                          f"this run is on {name}: leave --fp8 off")


def flat_params(params: list, options: SpeedOptions) -> list:
    """The parameters the optimizer and the clipping take: one flat buffer per dtype if `options.flat_params`."""
    if not options.flat_params:
        return params
    from .flat_params import flat_parameters

    return flat_parameters(params)
