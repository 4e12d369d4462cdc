"""What a model's files say about it, without loading it: architecture, trained context length,
parameter count, quantisation, chat format and size on disk.

Read from a GGUF file's header (scalars kept, arrays skipped, the tensor table summed) or from an
HF folder's JSON files and safetensors headers: milliseconds, where gguf.GGUFReader parses every
array and loading runs the model. The server answers /api/show and /api/tags from it.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, replace
from functools import lru_cache
from math import prod
from pathlib import Path

from ..errors import ModelFilesError
from ..formats import detect_format
from .registry import PHI_LORA_TARGETS, ModelSpec

# llama.cpp's LLAMA_FTYPE numbers (general.file_type) -> the names Ollama shows as quantization_level
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
              26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0"}


def file_type_name(ftype) -> str | None:
    """The name of a GGUF's general.file_type (an int, or its digits as llama-cpp-python's metadata gives them),
    or None where it is absent or not in FILE_TYPES."""
    return FILE_TYPES.get(int(ftype)) if ftype is not None and str(ftype).isdigit() else None


# The special tokens detect_format looks for: the only array entries kept from a GGUF's vocabulary.
SPECIALS = {"<|im_sep|>", "<|tool_call|>", "<|end|>", "<|assistant|>", "<|im_start|>", "<|im_end|>"}
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class WeightsMeta:
    architecture: str  # "llama", "phi3", ... (GGUF general.architecture, HF model_type)
    context_length: int | None  # the context the model was trained for
    parameters: int | None
    quant: str  # "Q4_1", "F16", "BF16", "nf4", ...
    format: str | None  # the chat format detected from its special tokens (None: unknown)
    file_format: str  # "gguf" or "safetensors"
    size_bytes: int  # on disk


class _Reader:
    def __init__(self, buf, path: str):
        self.buf, self.at, self.path = buf, 0, path

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += struct.calcsize(fmt)
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        s = self.buf[self.at:self.at + n]
        self.at += n
        return s

    def value(self, kind: int, specials: set[str]):
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])
        if kind == _STRING:
            return self.string().decode("utf-8", "replace")
        if kind != _ARRAY:
            raise ModelFilesError(f"{self.path}: unknown GGUF value type {kind}: the file is damaged or newer than this reader")
        item, n = self.take("<I"), self.take("<Q")
        if item in _SCALAR:  # skipped: numbers (token scores, types) say nothing asked for here
            self.at += n * struct.calcsize(_SCALAR[item])
        elif item == _STRING:
            for _ in range(n):
                s = self.string()
                if s.startswith(b"<|"):
                    specials.add(s.decode("utf-8", "replace"))
        else:
            for _ in range(n):
                self.value(item, specials)
        return None


def gguf_header(path: str) -> tuple[dict, int, set[str]]:
    """(scalar metadata, parameter count, special tokens of SPECIALS present) of a GGUF file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, path)
        try:
            if r.take("<4s") != b"GGUF":
                raise ModelFilesError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
            version = r.take("<I")
            if version < 2:
                raise ModelFilesError(f"{path} is GGUF version {version}, too old to read: convert it again with llama.cpp")
            n_tensors, n_kv = r.take("<Q"), r.take("<Q")
            kv, specials = {}, set()
            for _ in range(n_kv):
                key = r.string().decode("utf-8", "replace")
                v = r.value(r.take("<I"), specials)
                if v is not None:
                    kv[key] = v
            params = 0
            for _ in range(n_tensors):
                r.string()
                dims = [r.take("<Q") for _ in range(r.take("<I"))]
                r.take("<I"), r.take("<Q")  # type, offset
                params += prod(dims)
        except (struct.error, ValueError, MemoryError):
            raise ModelFilesError(f"{path}: the GGUF header is cut short or damaged: copy the file again") from None
    return kv, params, specials & SPECIALS


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _safetensors_params(folder: Path) -> int | None:
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                head = json.loads(fh.read(min(n, 100_000_000)))
        except (OSError, struct.error, ValueError):
            return None
        total += sum(prod(t["shape"]) for k, t in head.items() if k != "__metadata__" and isinstance(t, dict))
    return total or None


def _hf_specials(folder: Path) -> set[str]:
    found = set()
    for t in _json(folder / "tokenizer.json").get("added_tokens", []):
        if isinstance(t, dict) and t.get("content") in SPECIALS:
            found.add(t["content"])
    for t in (_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).values():
        if isinstance(t, dict) and t.get("content") in SPECIALS:
            found.add(t["content"])
    return found


@lru_cache(maxsize=64)
def _gguf_meta(path: str, _stamp: tuple) -> WeightsMeta:
    kv, params, specials = gguf_header(path)
    arch = str(kv.get("general.architecture", "llama"))
    fmt = detect_format(specials)
    ftype = kv.get("general.file_type")
    return WeightsMeta(arch, kv.get(f"{arch}.context_length"), params or None, file_type_name(ftype) or str(ftype or "unknown"),
                       fmt.name if fmt else None, "gguf", Path(path).stat().st_size)


@lru_cache(maxsize=64)
def _hf_meta(path: str, _stamp: tuple) -> WeightsMeta:
    d = Path(path)
    cfg = _json(d / "config.json")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    q = cfg.get("quantization_config") or {}
    quant = "nf4" if q.get("load_in_4bit") or q.get("_load_in_4bit") else str(q.get("quant_method") or cfg.get("torch_dtype") or cfg.get("dtype") or "unknown")
    fmt = detect_format(_hf_specials(d))
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    return WeightsMeta(str(cfg.get("model_type") or "unknown"), text.get("max_position_embeddings"), _safetensors_params(d),
                       quant.upper() if quant in ("float16", "bfloat16", "float32") else quant,
                       fmt.name if fmt else None, "safetensors", size)


def _stamp(p: Path) -> tuple:
    st = p.stat()
    return (st.st_mtime_ns, st.st_size)


def describe(spec: ModelSpec) -> WeightsMeta:
    """The WeightsMeta of a located spec (registry.resolve); from the registry's figures when its
    weights are neither a GGUF file nor a local folder. Raises ModelFilesError for a damaged GGUF."""
    if spec.gguf_file or spec.path:
        meta = (_gguf_meta(spec.gguf_file, _stamp(Path(spec.gguf_file))) if spec.gguf_file
                else _hf_meta(spec.path, _stamp(Path(spec.path) / "config.json")))
        if spec.format or spec.params:  # a registry model: its own figures are exact
            meta = replace(meta, context_length=meta.context_length or spec.context, parameters=spec.params or meta.parameters,
                           format=spec.format or meta.format)
        return meta
    arch = "phi3" if spec.lora_targets == PHI_LORA_TARGETS else "llama"
    return WeightsMeta(arch, spec.context, spec.params, "unknown", spec.format, "safetensors", 0)


__all__ = ["WeightsMeta", "describe", "gguf_header", "FILE_TYPES"]
