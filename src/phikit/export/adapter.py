"""A LoRA adapter rewritten for the other layout of a Phi model, with the module names vLLM's
LoRA loader accepts for that architecture.

vLLM loads a LoRA module by module: `LlamaForCausalLM` takes q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj (it packs the first three and the next two itself), while
`Phi3ForCausalLM` maps qkv_proj and gate_up_proj to themselves and so refuses the split names.
Both rewrites are exact, not approximations:

- fused -> split: the fused LoRA's one A serves every part, so each part gets that A and its
  own rows of B (same rank, same alpha).
- split -> fused: the parts' A matrices stacked ([A_q; A_k; A_v], rank 3r) and their B
  matrices on the block diagonal, so each part still sees only its own update. vLLM (and
  PEFT's plain config) want one rank for all modules, so every module is padded with zeros to
  the largest (3r with q/k/v targeted), and alpha grows with the rank to keep alpha / r (or
  alpha / sqrt(r) with rsLoRA) as it was.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..errors import ModelFilesError, PhikitError
from ..models.llamafy import FUSED, SPLIT, LayoutError, Widths, converted_from

LAYOUTS = ("llama", "phi3")
ARCH = {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}
# The modules vLLM's LoRA loader expects for each architecture: its packed_modules_mapping's parts plus the
# unpacked linear layers (vllm/model_executor/models/llama.py and phi3.py).
VLLM_MODULES = {
    "LlamaForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "Phi3ForCausalLM": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}
_A, _B = ".lora_A.weight", ".lora_B.weight"


def adapter_layout(names) -> str | None:
    """'phi3' when the LoRA modules include fused ones, 'llama' when they include split ones, else None."""
    mods = {_module(n) for n in names}
    if mods & set(FUSED):
        return "phi3"
    if mods & set(SPLIT):
        return "llama"
    return None


def _module(key: str) -> str:
    return key.removesuffix(_A).removesuffix(_B).rpartition(".")[2]


def read_adapter(adapter: str | Path) -> tuple[dict, dict]:
    """(adapter_config, weights) of a PEFT LoRA directory, refusing what the rewrite cannot carry exactly."""
    from safetensors.torch import load_file

    from ..models.adapters import check_adapter_dir

    check_adapter_dir(str(adapter))
    d = Path(adapter)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PhikitError(f"{adapter} is a {cfg.get('peft_type')} adapter; the layout rewrite handles LoRA")
    for key, what in (("use_dora", "DoRA's magnitude vector"), ("rank_pattern", "a per-module rank"),
                      ("alpha_pattern", "a per-module alpha")):
        if cfg.get(key):
            raise PhikitError(f"{adapter} uses {what} ({key}), which the layout rewrite does not carry over: "
                              "merge it instead (phikit export --format merged --layout ...)")
    if (d / "adapter_model.safetensors").is_file():
        weights = load_file(str(d / "adapter_model.safetensors"))
    else:
        import torch

        weights = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    return cfg, weights


def split_lora(weights: dict, widths: Widths) -> dict:
    """Fused-layout LoRA weights as split-layout ones (exact, same rank)."""
    out = {}
    for key, t in weights.items():
        module = _module(key)
        if module not in FUSED or not key.endswith((_A, _B)):
            out[key] = t
            continue
        stem = key.removesuffix(_A).removesuffix(_B)
        prefix, suffix = stem.rpartition(".")[0], key[len(stem):]
        pieces = [t] * len(FUSED[module]) if key.endswith(_A) else t.split(widths.rows(module), dim=0)
        for part, piece in zip(FUSED[module], pieces):
            out[f"{prefix}.{part}{suffix}"] = piece.clone()
    return out


def fuse_lora(weights: dict, widths: Widths, r: int) -> tuple[dict, int]:
    """Split-layout LoRA weights as fused-layout ones of one rank (exact); returns (weights, new rank)."""
    import torch

    groups: dict[tuple[str, str], dict] = {}
    rest = {}
    for key, t in weights.items():
        module = _module(key)
        if module in SPLIT and key.endswith((_A, _B)):
            stem = key.removesuffix(_A).removesuffix(_B)
            groups.setdefault((stem.rpartition(".")[0], SPLIT[module]), {})[(module, key.endswith(_A))] = t
        else:
            rest[key] = t
    rank = max([r] + [r * len({m for m, _ in g}) for g in groups.values()])
    if rank != r and any("lora_embedding" in k for k in rest):
        raise PhikitError("the adapter also trains the embedding (LoRA on embed_tokens), whose rank cannot be raised with "
                          "the others here: merge it instead (phikit export --format merged --layout phi3)")
    out = {}
    for (prefix, fused), g in groups.items():
        a_any = next(t for (_, is_a), t in g.items() if is_a)
        rows = widths.rows(fused)
        a = torch.zeros(rank, a_any.shape[1], dtype=a_any.dtype)
        b = torch.zeros(sum(rows), rank, dtype=a_any.dtype)
        col = row = 0
        for part, n in zip(FUSED[fused], rows):
            if (part, True) in g:
                a[col:col + r] = g[(part, True)]
                b[row:row + n, col:col + r] = g[(part, False)]
                col += r
            row += n
        out[f"{prefix}.{fused}{_A}"], out[f"{prefix}.{fused}{_B}"] = a, b
    for key, t in rest.items():  # the unfused modules: padded with zeros to the common rank
        if key.endswith(_A) and t.shape[0] < rank:
            t = torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])])
        elif key.endswith(_B) and t.shape[1] < rank:
            t = torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1)
        out[key] = t
    return out, rank


def check_vllm_names(weights, arch: str) -> None:
    """Raise PhikitError when a LoRA module name is one vLLM's `arch` would refuse."""
    have = {_module(k) for k in weights if k.endswith((_A, _B))}
    bad = have - VLLM_MODULES[arch]
    if bad:
        raise PhikitError(f"LoRA modules {', '.join(sorted(bad))} are not ones vLLM's {arch} accepts "
                          f"({', '.join(sorted(VLLM_MODULES[arch]))})")


def write_adapter(adapter: str, out: Path, layout: str | None, model: str | None = None) -> list[str]:
    """Write `adapter` to the directory `out` in `layout` ('llama' | 'phi3'; None: its own), for the base `model`
    (default: the adapter's base) in that layout. Returns notes for the user. Raises PhikitError / LayoutError."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from ..models.adapters import adapter_base
    from ..models.registry import REGISTRY, resolve

    if layout is not None and layout not in LAYOUTS:
        raise PhikitError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    cfg, weights = read_adapter(adapter)
    own = adapter_layout(weights)
    layout = layout or own or "llama"
    base = model or adapter_base(adapter)
    if not base:
        raise PhikitError(f"{adapter} does not record its base model: pass --model")
    spec = resolve(base)
    if not spec.path:
        raise ModelFilesError(f"{spec.name}: the base's config.json is needed to split or fuse the LoRA matrices, "
                              "and its files are not on this machine: pass --model with its directory")
    base_cfg = AutoConfig.from_pretrained(spec.path)
    widths = Widths.of(base_cfg)
    notes, new_base, r, alpha = [], spec.name if spec.name in REGISTRY else spec.source, cfg["r"], cfg["lora_alpha"]
    if own == layout or own is None:
        notes.append(f"the adapter is already in the {layout} layout: written with its names checked")
    elif layout == "llama":
        weights = split_lora(weights, widths)
        if converted_from(spec.path):  # --model named the converted directory itself
            new_base = spec.source
        else:
            notes.append(f"for the Llama layout of {new_base}: serve it on that layout "
                         f"(phikit convert {new_base} --to llama --out DIR), and pass DIR as the base")
    else:
        meta = converted_from(spec.path)
        if meta is None:
            raise LayoutError(f"{spec.name} is a Llama-layout model that phikit convert did not make from a Phi model, so it "
                              "has no Phi layout to write the adapter for")
        weights, rank = fuse_lora(weights, widths, r)
        alpha *= math.sqrt(rank / r) if cfg.get("use_rslora") else rank / r
        r, new_base = rank, (meta["base_model"] if meta["base_model"] in REGISTRY else meta["converted_from"])
        notes.append(f"rank {cfg['r']} -> {rank} (parts stacked, zero-padded), lora_alpha {cfg['lora_alpha']} -> {alpha:g}: "
                     "the same update; for the Phi layout of " + new_base)
    check_vllm_names(weights, ARCH[layout])
    out.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg.update(r=r, lora_alpha=alpha, base_model_name_or_path=new_base,
               target_modules=sorted({_module(k) for k in weights if k.endswith((_A, _B))}))
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    meta_in = Path(adapter) / "phikit.json"
    meta = json.loads(meta_in.read_text()) if meta_in.is_file() else {}
    meta.update(base_model=new_base, layout=layout, rewritten_from=str(adapter), notes=notes)
    (out / "phikit.json").write_text(json.dumps(meta, indent=2, default=str))
    for extra in ("README.md",):
        if (Path(adapter) / extra).is_file():
            shutil.copyfile(Path(adapter) / extra, out / extra)
    return notes
