"""Load a base model (+ LoRA adapter) with transformers and merge the adapter into it.

The merge happens in fp32 on the CPU: from the 16-bit weights when the base is
a Hugging Face directory of 16-bit (or 32-bit) weights, otherwise from the
dequantised weights of a quantised base (a bitsandbytes NF4 directory, or a
quantised GGUF), with a warning saying so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PhikitError, require
from ..formats import ChatFormat, detect_format, get_format
from ..models.registry import ModelSpec, resolve

log = logging.getLogger("phikit")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Merged:
    """A model ready to export: merged weights (fp32, CPU), the fixed tokenizer, its chat format."""

    model: object
    tokenizer: object
    fmt: ChatFormat
    spec: ModelSpec
    adapter: str | None
    notes: list[str] = field(default_factory=list)  # warnings and fixes, for the user
    phi3_config: dict | None = None  # the Phi config a Llama-layout model converts back to (llamafy.to_phi3)

    @property
    def config(self):
        return self.model.config


def quantised_source(spec: ModelSpec) -> str | None:
    """A sentence naming the quantisation of the base's weights, or None for 16/32-bit weights."""
    if spec.gguf_file:
        import gguf

        reader = gguf.GGUFReader(spec.gguf_file)
        kinds = {t.tensor_type.name for t in reader.tensors} - {"F32", "F16", "BF16"}
        return f"a GGUF file with {'/'.join(sorted(kinds))} weights" if kinds else None
    if spec.path:
        cfg = json.loads((Path(spec.path) / "config.json").read_text())
        q = cfg.get("quantization_config") or {}
        if q:
            kind = q.get("bnb_4bit_quant_type") or q.get("quant_method") or "quantised"
            return f"a {kind} ({q.get('quant_method', '?')}) checkpoint"
    return None


def load_merged(model: str | None, adapter: str | None = None, chat_format: str | None = None,
                layout: str | None = None) -> Merged:
    """Load `model` (registry name, HF dir, .gguf, hub id; default: the adapter's base)
    in fp32 on the CPU, fix its tokenizer, and merge `adapter` into it; then, where `layout`
    ('llama' | 'phi3') is not the model's own, split or fuse the merged weights into it
    (models/llamafy.py: exact; 'phi3' needs a model that `phikit convert` made).

    Raises PhikitError when the adapter was made for another base (naming both),
    when the chat format cannot be told, or when files are missing; LayoutError when the
    model has no such layout.
    """
    import torch

    from ..models.adapters import adapter_base, check_adapter_base
    from ..models.fixes import apply_fixes
    from ..models.llamafy import converted_from
    from ..models.loading import load_hf

    if model is None and adapter:
        model = adapter_base(adapter)
        if not model:
            raise PhikitError(f"{adapter} does not record its base model: pass --model")
    spec = resolve(model)
    if not (spec.gguf_file or spec.path or spec.hub_id):
        raise PhikitError(f"{spec.name}: its weights are not installed; run the setup command in the README")
    if adapter:
        check_adapter_base(adapter, spec)  # before the (slow) load
    notes: list[str] = []
    quantised = quantised_source(spec)
    hf_model, tok, _ = load_hf(spec, device="cpu", dtype="float32")
    if quantised:
        # bitsandbytes layers are dequantised here; transformers has already dequantised a GGUF
        # into plain tensors but keeps a marker that makes save_pretrained refuse: drop it.
        if getattr(hf_model, "is_loaded_in_4bit", False) or getattr(hf_model, "is_loaded_in_8bit", False):
            hf_model = hf_model.dequantize()
        elif spec.gguf_file:
            hf_model.hf_quantizer = None
            hf_model.is_quantized = False
            if hasattr(hf_model.config, "quantization_config"):
                del hf_model.config.quantization_config
        hf_model = hf_model.to(torch.float32)
        notes.append(
            f"the base {spec.name} is {quantised}: merged into its dequantised fp32 weights, not the original "
            "16-bit ones; pass a 16-bit copy of the base with --model for a faithful export"
        )
    fmt = get_format(chat_format or spec.format) if (chat_format or spec.format) else detect_format(tok.get_vocab())
    if fmt is None:
        raise PhikitError(f"cannot tell the chat format of {spec.name} from its tokenizer: pass --chat-format (chatml, phi3, phi4-mini, phi4)")
    notes += [f"tokenizer fix: {f}" for f in apply_fixes(tok, fmt)]
    if adapter:
        peft = require("peft", why="merging an adapter needs peft")
        hf_model = peft.PeftModel.from_pretrained(hf_model, adapter, is_trainable=False).merge_and_unload()
    phi3_config = hf_model.config.to_dict() if hf_model.config.model_type == "phi3" else (converted_from(spec.path) or {}).get("phi3_config")
    if layout:
        hf_model, note = _in_layout(hf_model, layout, spec, phi3_config)
        notes += [note] if note else []
    hf_model.eval()
    for n in notes:
        log.warning("%s", n)
    return Merged(hf_model, tok, fmt, spec, adapter, notes, phi3_config)


def _in_layout(model, layout: str, spec: ModelSpec, phi3_config: dict | None):
    """(`model` in `layout`, a note saying so, or None where it already was)."""
    from ..models.llamafy import LayoutError, to_llama, to_phi3

    kind = getattr(model.config, "model_type", "?")
    if layout not in ("llama", "phi3"):
        raise PhikitError(f"unknown layout {layout!r}: use llama or phi3")
    if kind == layout:
        return model, None
    if layout == "llama":
        return to_llama(model), f"converted to the Llama layout (q/k/v and gate/up split) from {kind}"
    if kind != "llama" or not phi3_config:
        raise LayoutError(f"{spec.name} is a {kind} model that phikit convert did not make from a Phi model: "
                          "it has no Phi layout to write")
    return to_phi3(model, phi3_config), "converted back to the Phi layout (q/k/v and gate/up fused)"


def save_merged(m: Merged, out: Path, dtype: str = "bfloat16") -> None:
    """Write `m` to the directory `out` as safetensors in `dtype`, with the fixed tokenizer
    and a chat template generated from the chat format (loads with plain transformers)."""
    import torch

    if dtype not in DTYPES:
        raise PhikitError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    target = getattr(torch, dtype)
    # A cast copy of the weights: the fp32 model stays as it is for any further export.
    state = {k: v.detach().to(target) for k, v in m.model.state_dict().items()}
    if getattr(m.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: transformers re-ties it on load
    m.model.save_pretrained(out, state_dict=state, safe_serialization=True)
    # save_pretrained records the in-memory (fp32) dtype; record the one on disk.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    cfg_path.write_text(json.dumps(cfg, indent=2))
    m.tokenizer.chat_template = m.fmt.hf_template()
    m.tokenizer.save_pretrained(out)
    meta = {"base_model": m.spec.name, "source": m.spec.source, "adapter": m.adapter, "chat_format": m.fmt.name,
            "layout": m.config.model_type, "notes": m.notes}
    if m.config.model_type == "llama" and m.phi3_config:  # what converts it back (llamafy.converted_from reads it)
        meta.update(converted_from=m.spec.source, phi3_config=m.phi3_config)
    (out / "phikit.json").write_text(json.dumps(meta, indent=2))
