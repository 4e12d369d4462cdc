"""Llama-fication: a Phi-3-family checkpoint split into the Llama layout, and back.

Phi-3, Phi-3.5 and phi-4 (`model_type: phi3`) are Llama's decoder (RMSNorm, SiLU-gated MLP,
rotate-half RoPE, no biases) with q, k, v fused into one `qkv_proj` and gate and up into one
`gate_up_proj`. Splitting those two matrices by rows gives a `LlamaForCausalLM` that computes
the same function, so every tool that knows Llama runs it, and LoRA gets one A matrix per
projection instead of one shared across the fused parts. The config maps field by field; the
rope goes over as transformers' own rope parameters (LongRoPE's factors, its original context
and its attention factor written out, so no reader has to recompute them). Where the Llama
layout cannot say what the model does, the conversion is refused with the reason
(`why_not`): Phi-4-mini's partial rotary embedding (Llama rotates the whole head), a sliding
window shorter than the context (Phi-3-mini-4k's 2047; `max_context` cuts the context to it),
residual dropout.

    convert("phi-4", "phi-4-llama")          # streams the safetensors shards, tokenizer kept
    to_llama(model) / to_phi3(model, cfg)    # the same split / fuse on a loaded model

The converted directory keeps the tokenizer (with phikit's fixes applied), hence the chat
format, which phikit detects from the tokenizer's special tokens; `phikit.json` records the
source and its Phi config, from which `to_phi3` rebuilds the fused layout.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelFilesError, PhikitError

log = logging.getLogger("phikit")

# fused Phi name -> the Llama names it splits into, in row order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SPLIT = {part: fused for fused, parts in FUSED.items() for part in parts}
META = "phikit.json"
# Tokenizer and model-card files a converted directory keeps byte for byte.
KEEP = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json",
        "LICENSE", "LICENSE.md", "NOTICE.md", "README.md")


class LayoutError(PhikitError):
    """The model cannot be converted to (or from) the Llama layout exactly."""


@dataclass(frozen=True)
class Widths:
    """Row counts of the fused matrices' parts."""

    q: int
    kv: int
    intermediate: int

    @classmethod
    def of(cls, cfg) -> "Widths":
        hd = head_dim(cfg)
        return cls(cfg.num_attention_heads * hd, (cfg.num_key_value_heads or cfg.num_attention_heads) * hd, cfg.intermediate_size)

    def rows(self, fused: str) -> tuple[int, ...]:
        return (self.q, self.kv, self.kv) if fused == "qkv_proj" else (self.intermediate, self.intermediate)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope(cfg) -> dict:
    """The rope settings as one dict, from transformers v5's rope_parameters or v4's rope_scaling + rope_theta."""
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rp.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type") or "default")
    return rp


def why_not(cfg, max_context: int | None = None) -> list[str]:
    """What in the Phi config `cfg` the Llama layout cannot express (empty: it converts exactly)."""
    if getattr(cfg, "model_type", None) != "phi3":
        kind = getattr(cfg, "model_type", "?")
        return [f"it is a {kind!r} model, not a phi3 one (Phi-3, Phi-3.5, Phi-4-mini, phi-4)"
                + ("; it is already in the Llama layout" if kind == "llama" else "")]
    rp = _rope(cfg)
    out = []
    partial = float(rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        out.append(f"its rotary embedding turns only {partial:g} of each head (partial_rotary_factor, as in Phi-4-mini); "
                   "the Llama layout rotates the whole head and has no field for a part")
    if rp["rope_type"] not in ("default", "longrope"):
        out.append(f"its rope type {rp['rope_type']!r} is not one the conversion knows (default RoPE or LongRoPE)")
    if max_context is not None and not 0 < max_context <= cfg.max_position_embeddings:
        out.append(f"--max-context {max_context} is outside its context of 1 to {cfg.max_position_embeddings} tokens")
    window = getattr(cfg, "sliding_window", None)
    context = max_context or cfg.max_position_embeddings
    if window and window < context:
        out.append(f"it attends within a sliding window of {window} tokens of its {cfg.max_position_embeddings}-token "
                   f"context, and the Llama layout has no sliding window: pass --max-context {window} (or less) "
                   "to convert it for contexts up to the window, where the two attend alike")
    if float(getattr(cfg, "resid_pdrop", 0.0) or 0.0):
        out.append(f"it drops out residuals in training (resid_pdrop {cfg.resid_pdrop}), which Llama does not; "
                   "set resid_pdrop to 0 in its config.json if that does not matter to you")
    if getattr(cfg, "quantization_config", None):
        out.append("its weights are quantised; convert a 16-bit copy")
    return out


def llama_config(phi, max_context: int | None = None):
    """The `LlamaConfig` that computes what the Phi3Config `phi` does. Raises LayoutError naming what it cannot."""
    from transformers import LlamaConfig

    problems = why_not(phi, max_context)
    if problems:
        raise LayoutError("cannot convert to the Llama layout exactly: " + "; ".join(problems))
    rp = _rope(phi)
    kw = {}
    if rp["rope_type"] == "longrope":
        orig = rp.get("original_max_position_embeddings") or phi.original_max_position_embeddings
        # The source's own attention factor, as transformers computes it, written out: a reader of the new
        # config would otherwise derive it from max_position_embeddings, which --max-context may change.
        attn = rp.get("attention_factor")
        if attn is None:
            scale = phi.max_position_embeddings / orig
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        kw["rope_scaling"] = {
            "rope_type": "longrope", "short_factor": list(rp["short_factor"]), "long_factor": list(rp["long_factor"]),
            "original_max_position_embeddings": orig, "factor": phi.max_position_embeddings / orig,
            "attention_factor": attn,
        }
        # transformers (and vLLM) switch to the long factors past this length; it must be the source's.
        kw["original_max_position_embeddings"] = orig
    return LlamaConfig(
        vocab_size=phi.vocab_size, hidden_size=phi.hidden_size, intermediate_size=phi.intermediate_size,
        num_hidden_layers=phi.num_hidden_layers, num_attention_heads=phi.num_attention_heads,
        num_key_value_heads=phi.num_key_value_heads or phi.num_attention_heads, head_dim=head_dim(phi),
        hidden_act=phi.hidden_act, max_position_embeddings=max_context or phi.max_position_embeddings,
        initializer_range=phi.initializer_range, rms_norm_eps=phi.rms_norm_eps, use_cache=phi.use_cache,
        tie_word_embeddings=bool(phi.tie_word_embeddings), attention_bias=False, mlp_bias=False,
        attention_dropout=phi.attention_dropout, bos_token_id=phi.bos_token_id, eos_token_id=phi.eos_token_id,
        pad_token_id=phi.pad_token_id, rope_theta=float(rp["rope_theta"]), architectures=["LlamaForCausalLM"], **kw,
    )


def split_tensor(name: str, t, widths: Widths) -> list[tuple[str, object]]:
    """`name`'s tensor as the Llama layout's tensors: a fused weight split by rows, anything else as it is."""
    stem, _, suffix = name.rpartition(".")
    module = stem.rpartition(".")[2]
    if module not in FUSED:
        return [(name, t)]
    rows = widths.rows(module)
    if t.shape[0] != sum(rows):
        raise ModelFilesError(f"{name} has {t.shape[0]} rows, not the {sum(rows)} its config implies: the checkpoint and config.json disagree")
    prefix = stem.rpartition(".")[0]
    # Row blocks of the fused tensor are views, not copies: safetensors writes each view's own bytes.
    return [(f"{prefix}.{part}.{suffix}", piece) for part, piece in zip(FUSED[module], t.split(rows, dim=0))]


def split_state_dict(sd: dict, widths: Widths) -> dict:
    return {k: v for name, t in sd.items() for k, v in split_tensor(name, t, widths)}


def fuse_state_dict(sd: dict) -> dict:
    """The Phi layout's state dict from a Llama-layout one: q, k, v (gate, up) concatenated by rows."""
    import torch

    out, parts = {}, {}
    for name, t in sd.items():
        stem, _, suffix = name.rpartition(".")
        prefix, _, module = stem.rpartition(".")
        if module in SPLIT:
            parts.setdefault((prefix, SPLIT[module], suffix), {})[module] = t
        else:
            out[name] = t
    for (prefix, fused, suffix), got in parts.items():
        missing = [p for p in FUSED[fused] if p not in got]
        if missing:
            raise ModelFilesError(f"{prefix}: {', '.join(missing)} missing, so {fused} cannot be rebuilt")
        out[f"{prefix}.{fused}.{suffix}"] = torch.cat([got[p] for p in FUSED[fused]], dim=0)
    return out


def _build(cls, cfg, sd: dict, dtype):
    """A model of `cls` holding the tensors of `sd`, made without initialising weights that are overwritten."""
    import torch

    cfg.dtype = dtype
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    # Buffers computed at construction (the rotary frequencies) are not in a state dict: build them for real.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=cfg)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise ModelFilesError(f"the converted model lacks {', '.join(left[:5])}: the source checkpoint is incomplete")
    return model.eval()


def to_llama(model, max_context: int | None = None):
    """A loaded Phi3ForCausalLM as a LlamaForCausalLM with the same weights (split) and outputs."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(model.config, max_context)
    dtype = next(model.parameters()).dtype
    return _build(LlamaForCausalLM, cfg, split_state_dict(model.state_dict(), Widths.of(model.config)), dtype)


def to_phi3(model, phi_config: dict):
    """A Llama-layout model (made by this module) back in the Phi layout, as `phi_config` (the source's config) says."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config.from_dict(phi_config)
    ours = Widths.of(model.config)
    if Widths.of(cfg) != ours or cfg.num_hidden_layers != model.config.num_hidden_layers:
        raise LayoutError("the model's shape differs from the Phi config it was converted from: it is not that model's Llama layout")
    dtype = next(model.parameters()).dtype
    return _build(Phi3ForCausalLM, cfg, fuse_state_dict(model.state_dict()), dtype)


def converted_from(path: str | Path | None) -> dict | None:
    """The record a conversion left in the model directory `path` (source, chat format, Phi config), or None."""
    if not path:
        return None
    p = Path(path) / META
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("layout") == "llama" and meta.get("phi3_config") else None


@dataclass
class ConvertResult:
    out: str
    source: str
    chat_format: str
    tensors: int
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _shards(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelFilesError(
            f"{src} has no *.safetensors weights: the conversion reads safetensors. Write them with "
            f"`phikit export --model {src} --format merged --dtype bfloat16 --out DIR`, then convert DIR")
    return files


def convert(model: str, out: str | Path, *, force: bool = False, max_context: int | None = None) -> ConvertResult:
    """Write `model` (registry name, HF directory or hub id of a phi3-type model, safetensors) to the directory
    `out` in the Llama layout: split weights (shard by shard, in their own dtype), a LlamaConfig, the tokenizer
    (phikit's fixes applied) and phikit.json. Raises LayoutError when the Llama layout cannot express the model
    exactly, ModelFilesError / PhikitError for missing files or an existing `out` (unless `force`)."""
    import time

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from ..export.files import atomic_path, check_out, size_of
    from .registry import resolve

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    check_out(out, force)
    spec = resolve(model)
    if spec.gguf_file:
        raise ModelFilesError(f"{spec.gguf_file} is a GGUF file; the conversion reads a Hugging Face directory of safetensors weights")
    if not spec.path:
        raise ModelFilesError(f"{spec.name}: its weights are not on this machine; download {spec.hub_id or spec.name} "
                              "(or copy it to a directory) and pass that")
    src = Path(spec.path)
    phi = AutoConfig.from_pretrained(src)
    cfg = llama_config(phi, max_context)  # refuses before anything is written
    shards = _shards(src)
    tok, fmt, fixes = _fixed_tokenizer(src, spec)
    widths = Widths.of(phi)
    weight_map, n = {}, 0
    with atomic_path(out, force) as tmp:
        tmp.mkdir()
        for shard in shards:
            tensors = {}
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    for new, t in split_tensor(name, f.get_tensor(name), widths):
                        tensors[new] = t
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            weight_map.update({k: shard.name for k in tensors})
            n += len(tensors)
            del tensors
        if len(shards) > 1:
            total = sum((tmp / s.name).stat().st_size for s in shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_config(cfg, tmp, getattr(phi, "dtype", None) or getattr(phi, "torch_dtype", None))
        for name in KEEP:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if fixes or not tok.chat_template:  # the fixed tokenizer replaces the copied files, with the template phikit renders
            tok.chat_template = fmt.hf_template()
            tok.save_pretrained(tmp)
        notes = [f"tokenizer fix: {f}" for f in fixes]
        if max_context:
            notes.append(f"context cut to {max_context} tokens (max_position_embeddings), from {phi.max_position_embeddings}")
        meta = {"layout": "llama", "converted_from": spec.source, "base_model": spec.name, "chat_format": fmt.name,
                "max_context": max_context, "notes": notes, "phi3_config": phi.to_dict()}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    for note in notes:
        log.warning("%s", note)
    return ConvertResult(str(out), spec.source, fmt.name, n, size_of(out), round(time.perf_counter() - t0, 3), notes)


def _fixed_tokenizer(src: Path, spec):
    from transformers import AutoTokenizer

    from ..formats import detect_format, get_format
    from .fixes import apply_fixes

    tok = AutoTokenizer.from_pretrained(src)
    fmt = get_format(spec.format) if spec.format else detect_format(tok.get_vocab())
    if fmt is None:
        raise PhikitError(f"cannot tell the chat format of {spec.name} from its tokenizer, so the converted model could "
                          "not keep it: is this a Phi chat model?")
    return tok, fmt, apply_fixes(tok, fmt)


def _write_config(cfg, out: Path, dtype) -> None:
    cfg.save_pretrained(out)
    path = out / "config.json"
    d = json.loads(path.read_text())
    if dtype is not None:
        d["dtype"] = d["torch_dtype"] = str(dtype).removeprefix("torch.")
    # Readers built on transformers v4 (vLLM releases, llama.cpp's convert_hf_to_gguf.py) look for rope_theta and
    # rope_scaling; v5 writes rope_parameters only. Both say the same, so every reader gets the same rope.
    rp = dict(d.get("rope_parameters") or {})
    if rp:
        d["rope_theta"] = rp.pop("rope_theta", 10000.0)
        rp.pop("partial_rotary_factor", None)
        if rp.get("rope_type", "default") != "default":
            d["rope_scaling"] = {"type": rp["rope_type"], **rp}
    path.write_text(json.dumps(d, indent=2))


def training_copy(spec, out_dir: str | Path, make: bool = True):
    """The spec to train on for `phikit train --llamafy`: `spec` itself when it is in the Llama layout already,
    else its conversion in `out_dir`/base-llama (made once: a resumed run finds it there). With `make` False
    (the other processes of a multi-process run, before rank 0 has made it) it only checks, raising what the
    maker would, and returns None. Raises LayoutError / ModelFilesError."""
    from transformers import AutoConfig

    from .registry import REGISTRY, resolve

    if spec.gguf_file:
        raise ModelFilesError(f"--llamafy converts Hugging Face safetensors weights; {spec.gguf_file} is a GGUF file")
    if not spec.path:
        raise ModelFilesError(f"{spec.name}: its weights are not on this machine; download {spec.hub_id or spec.name} first")
    cfg = AutoConfig.from_pretrained(spec.path)
    if getattr(cfg, "model_type", None) == "llama":
        return spec
    problems = why_not(cfg)
    if problems:
        name = spec.name if spec.name in REGISTRY else spec.source
        raise LayoutError(f"--llamafy: cannot convert {spec.name} to the Llama layout exactly: " + "; ".join(problems)
                          + f". (`phikit convert {name} --to llama [--max-context N] --out DIR`, then --model DIR)")
    if not make:
        return None
    target = Path(out_dir) / "base-llama"
    meta = converted_from(target)
    if meta is None or meta.get("converted_from") != spec.source:
        convert(spec.name if spec.name in REGISTRY else spec.source, target, force=target.exists())
    return resolve(str(target))
