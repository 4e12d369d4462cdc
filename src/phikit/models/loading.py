"""Loading a model for the transformers backend: HF directory, hub id or GGUF;
16-bit or NF4 (bitsandbytes, double quantisation, bf16 compute), dynamic NF4 (the layers that lose most
to NF4 kept in 16-bit: models/dynamic4.py) or a directory saved pre-quantised; CPU or CUDA."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DeviceError, MissingDependencyError, ModelFilesError, ModelNotFoundError, require
from .registry import ModelSpec

log = logging.getLogger("phikit")
QUANTS = ("none", "nf4", "nf4-dynamic", "int4")


def resolve_device(device: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> a torch device string; DeviceError when CUDA is asked for and absent."""
    import torch

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible to PyTorch: use --device cpu (or auto)")
    return device


# bitsandbytes' CPU backend, imported on a CPU with AVX512-BF16 (the GPU hosts' Xeons), asks the `kernels`
# package for a faster NF4 matmul from the Hugging Face Hub (this repository). kernels >= 0.19 loads a kernel
# from a publisher it cannot verify only with trust_remote_code=True, which bitsandbytes does not pass, and
# offline there is nothing to fetch: the lookup fails every time, bitsandbytes falls back to the NF4 kernel it
# ships, and its log says "Failed to load CPU gemm_4bit_forward ... Set trust_remote_code=True" (offline,
# kernels adds "Skipping publisher trust check"). Nothing is lost and the user can do nothing about it, so
# import_bitsandbytes drops exactly these lines (no setting turns the lookup off: it runs in the module body).
_BNB_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
_BNB_LOOKUP_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def import_bitsandbytes(why: str = "--quant nf4 needs bitsandbytes"):
    """bitsandbytes, imported without the log lines of its failing hub-kernel lookup (see above);
    MissingDependencyError with an install hint when it is absent."""
    import sys

    if "bitsandbytes" in sys.modules:  # imported already: the lookup ran then, or never will
        return sys.modules["bitsandbytes"]
    loggers = [logging.getLogger(name) for name in _BNB_LOOKUP_LOGGERS]
    for lg in loggers:
        lg.addFilter(_drop_hub_kernel_lookup)
    try:
        return require("bitsandbytes", why=why)
    finally:
        for lg in loggers:
            lg.removeFilter(_drop_hub_kernel_lookup)


def _drop_hub_kernel_lookup(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for the lookup's lines only."""
    msg = record.getMessage()
    return not ("gemm_4bit_forward from kernels-community" in msg or _BNB_HUB_KERNEL in msg)


def nf4_config():
    """The tutorials' 4-bit recipe: NF4, double quantisation, bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import_bitsandbytes()
    except MissingDependencyError as e:
        raise DeviceError(str(e)) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _prequantized(spec: ModelSpec) -> bool:
    from .dynamic4 import prequantized

    return bool(spec.path and prequantized(spec.path))


def _source(spec: ModelSpec) -> tuple[str, dict]:
    if spec.gguf_file:
        p = Path(spec.gguf_file)
        return str(p.parent), {"gguf_file": p.name}
    if spec.path:
        return spec.path, {}
    if spec.hub_id:
        # Not on this machine: let transformers fetch it (works with a network; offline it fails below).
        return spec.hub_id, {}
    raise ModelNotFoundError(f"no weights found for {spec.name}")


def load_hf(spec: ModelSpec, quant: str = "none", device: str = "auto", dtype: str | None = None):
    """Load (model, tokenizer, device) with transformers. Raises PhikitError subclasses on bad input."""
    if quant not in QUANTS:
        raise DeviceError(f"unknown quantisation {quant!r}: use one of {', '.join(QUANTS)}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    src, extra = _source(spec)
    kwargs: dict = dict(extra)
    saved4 = _prequantized(spec)
    if saved4 and quant == "int4":
        raise DeviceError(f"{spec.path} is saved in NF4 (bitsandbytes): load it with --quant nf4 (or none: it loads as saved)")
    if quant == "int4" and not dev.startswith("cuda"):
        raise DeviceError("--quant int4 (tinygemm weight-only int4) runs on CUDA only: use --quant nf4 on the CPU")
    if saved4 or quant in ("nf4", "nf4-dynamic"):
        try:
            import_bitsandbytes()  # before transformers imports it: quietly (see import_bitsandbytes)
        except MissingDependencyError as e:
            raise DeviceError(str(e)) from None
    if saved4:
        # Saved pre-quantised (phikit quantize): its config says what is 4-bit; any --quant but int4 loads it as saved.
        if quant == "none":
            log.info("%s is saved in NF4: loading it as saved", spec.path)
        kwargs["device_map"] = {"": dev}
        kwargs["dtype"] = torch.bfloat16
    elif quant in ("nf4", "nf4-dynamic"):
        if spec.gguf_file:
            raise DeviceError(f"--quant {quant} loads Hugging Face weights; a GGUF file is already quantised: use --quant none"
                              + (", or write a dynamic NF4 checkpoint with `phikit quantize MODEL --dynamic --out DIR` and load DIR"
                                 if quant == "nf4-dynamic" else ""))
        if quant == "nf4-dynamic":
            from .dynamic4 import bnb_config, dynamic_skip_modules

            kwargs["quantization_config"] = bnb_config(dynamic_skip_modules(spec, dev))
        else:
            kwargs["quantization_config"] = nf4_config()
        kwargs["device_map"] = {"": dev}
        kwargs["dtype"] = torch.bfloat16
    else:
        # bf16 on GPU; fp32 on CPU, where bf16 matmuls are slower than fp32 on most chips.
        kwargs["dtype"] = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
        if quant == "int4":
            kwargs["dtype"] = torch.bfloat16
    try:
        tok = AutoTokenizer.from_pretrained(src, **extra)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as e:
        if spec.path or spec.gguf_file:
            raise ModelFilesError(f"could not load {src}: {e}") from None
        raise ModelNotFoundError(
            f"{spec.name} ({spec.hub_id}) is not on this machine and could not be downloaded ({str(e).splitlines()[0]}). "
            f"With a network: `hf download {spec.hub_id}`; otherwise copy the model to a directory and pass its path "
            "(or set PHIKIT_MODELS to a folder holding it under this name)."
        ) from None
    except (ImportError, RuntimeError) as e:
        if quant in ("nf4", "nf4-dynamic") or saved4:
            if saved4:
                raise DeviceError(f"{spec.path} is saved in NF4 and bitsandbytes could not load it here: {e}. Load the 16-bit model instead") from None
            raise DeviceError(f"--quant {quant} could not run here: {e}. Use --quant none") from None
        raise
    if quant in ("none", "int4") and not saved4:
        model.to(dev)
    if quant == "int4":
        from ..engine.kernels.int4 import quantize_model_int4

        quantize_model_int4(model)
    model.eval()
    return model, tok, dev
