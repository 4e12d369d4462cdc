"""Attaching a LoRA adapter (a standard PEFT directory) to a loaded base model."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelFilesError, PhikitError, require
from .registry import ModelSpec


WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFilesError(f"{path} cannot be read as JSON ({e}): the adapter is damaged; train it again or use another --adapter") from None
    if not isinstance(obj, dict):
        raise ModelFilesError(f"{path} is not a JSON object: the adapter is damaged; train it again or use another --adapter")
    return obj


def check_adapter_dir(adapter_dir: str) -> None:
    """Refuse, without loading anything, a path that is not a LoRA adapter directory (PEFT's files)."""
    d = Path(adapter_dir).expanduser()
    if not d.is_dir():
        raise ModelFilesError(f"adapter directory {adapter_dir} not found"
                              + (" (it is a file)" if d.exists() else "")
                              + ": pass the --out folder of a `phikit train` run (a PEFT adapter directory)")
    if not (d / "adapter_config.json").is_file():
        raise ModelFilesError(f"{adapter_dir} has no adapter_config.json: it is not a LoRA adapter directory")
    if not any((d / w).is_file() for w in WEIGHTS):
        raise ModelFilesError(f"{adapter_dir} has no adapter weights ({' or '.join(WEIGHTS)}): its training did not "
                              "finish; rerun it with --resume, or use another --adapter")


def adapter_base(adapter_dir: str) -> str | None:
    """The base model an adapter was trained on, as recorded in its phikit.json or adapter_config.json."""
    check_adapter_dir(adapter_dir)
    d = Path(adapter_dir).expanduser()
    meta = d / "phikit.json"
    if meta.is_file():
        base = _read_json(meta).get("base_model")
        if base:
            return base
    return _read_json(d / "adapter_config.json").get("base_model_name_or_path")


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
