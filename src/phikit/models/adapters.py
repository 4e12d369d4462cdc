"""Attaching a LoRA adapter (a standard PEFT directory) to a loaded base model."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelFilesError, PhikitError, require
from .registry import ModelSpec


def adapter_base(adapter_dir: str) -> str | None:
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        raise ModelFilesError(f"{adapter_dir} has no adapter_config.json: it is not a LoRA adapter directory")
    meta = Path(adapter_dir) / "phikit.json"
    if meta.is_file():
        base = json.loads(meta.read_text()).get("base_model")
        if base:
            return base
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def check_adapter_base(adapter_dir: str, spec: ModelSpec) -> None:
    """Refuse an adapter made for another base model, naming both."""
    base = adapter_base(adapter_dir)
    if not base:
        return
    names = {spec.name, spec.hub_id, spec.path, spec.gguf_file, spec.source}
    names |= {Path(n).name for n in list(names) if n}
    if base not in names and Path(base).name not in names:
        raise PhikitError(f"adapter {adapter_dir} was trained on {base!r}, not on {spec.name!r}: load it with --model {base}")


def attach_adapter(model, adapter_dir: str, spec: ModelSpec):
    """Return `model` wrapped with the LoRA adapter in `adapter_dir` (inference mode)."""
    check_adapter_base(adapter_dir, spec)
    peft = require("peft", why="--adapter needs peft")
    m = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    m.eval()
    return m
