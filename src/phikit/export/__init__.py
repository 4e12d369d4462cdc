"""Export a model (+ LoRA adapter) as merged safetensors, GGUF, an Ollama Modelfile or GPTQ 4-bit,
or the adapter alone rewritten for a layout (vLLM's module names).

    phikit.export.export("phi-3-mini", adapter="runs/a", format="gguf", out="m.gguf", quant="q4_0")
    phikit.export.export(None, adapter="runs/a", format="merged", layout="phi3", out="m")  # split-layout adapter, fused weights

Every format starts from the same merge (merge.py: fp32, on the CPU, tokenizer
fixed, chat template generated from the chat format) and writes beside the
target, renaming at the end (files.py), so an existing output is only
replaced with --force and an interrupted export leaves nothing under OUT; what
it left beside OUT (`.NAME.partial-PID`) the next export to that folder removes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PhikitError
from .files import atomic_path, check_out, remove_stale_partials, size_of

if TYPE_CHECKING:
    from .gptq import GPTQSettings

FORMATS = ("merged", "gguf", "ollama", "gptq", "adapter")
LAYOUTS = ("llama", "phi3")


@dataclass
class ExportResult:
    format: str
    out: str
    bytes: int
    seconds: float
    quant: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def export(
    model: str | None,
    *,
    format: str,
    out: str | Path,
    adapter: str | None = None,
    quant: str | None = None,
    system: str | None = None,
    force: bool = False,
    dtype: str = "bfloat16",
    chat_format: str | None = None,
    calib: str | None = None,
    gptq: "GPTQSettings | None" = None,
    layout: str | None = None,
) -> ExportResult:
    """Export `model` (+ `adapter`) to `out` in `format` (merged | gguf | ollama | gptq).

    quant: GGUF quant type (default f16; see gguf_file.QUANTS). system: SYSTEM line
    of an Ollama Modelfile. dtype: of merged weights. calib: calibration data for gptq
    (default: the adapter's training data, else the shared SQuAD set); gptq: AutoRound
    settings (gptq.GPTQSettings). layout: 'llama' (q/k/v and gate/up split) or 'phi3' (fused) for
    the weights written, default the model's own (models/llamafy.py); format 'adapter' writes only
    `adapter`, its LoRA modules renamed (and split or stacked, exactly) for that layout, with the
    names vLLM's LoRA loader accepts for it. Raises PhikitError on bad input; nothing is written
    under `out` unless the export completes.
    """
    if format not in FORMATS:
        raise PhikitError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if layout is not None and layout not in LAYOUTS:
        raise PhikitError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    out = Path(out).expanduser()
    check_out(out, force)  # fail before the slow load
    cleaned = remove_stale_partials(out.parent)  # what killed exports left in the folder: disk space for this one
    if format == "adapter":
        if not adapter:
            raise PhikitError("--format adapter rewrites a LoRA adapter: pass --adapter DIR")
        if quant or calib or gptq or dtype != "bfloat16":
            raise PhikitError("--quant, --dtype and the GPTQ settings do not apply to --format adapter")
        from .adapter import write_adapter

        t0 = time.perf_counter()
        with atomic_path(out, force) as tmp:
            notes = write_adapter(adapter, tmp, layout, model)
        return ExportResult(format, str(out), size_of(out), round(time.perf_counter() - t0, 3), None, cleaned + notes)
    if format in ("gguf", "ollama"):
        from .gguf_file import QUANTS

        quant = (quant or "f16").lower()
        if quant not in QUANTS:
            raise PhikitError(f"unknown GGUF quant {quant!r}: use one of {', '.join(QUANTS)}")
    elif quant:
        raise PhikitError(f"--quant applies to gguf and ollama exports, not {format}")
    if format == "gptq":
        from .gptq import GPTQSettings, calibration_source

        gptq = gptq or GPTQSettings()
        gptq.check()
        calib_path, calib_note = calibration_source(calib, adapter)  # before the slow load
    elif calib or gptq:
        raise PhikitError(f"--calib and the GPTQ settings apply to gptq exports, not {format}")
    t0 = time.perf_counter()
    from .merge import load_merged, save_merged

    m = load_merged(model, adapter, chat_format, layout)
    with atomic_path(out, force) as tmp:
        if format == "merged":
            save_merged(m, tmp, dtype)
        elif format == "gguf":
            from .gguf_file import write_gguf

            write_gguf(m, tmp, quant)
        elif format == "gptq":
            from .gptq import write_gptq

            m.notes += write_gptq(m, tmp, gptq, calib_path, calib_note)
            quant = f"w{gptq.bits}g{gptq.group_size}"
        else:
            from .gguf_file import write_gguf
            from .ollama import modelfile

            tmp.mkdir()
            name = f"{m.spec.name}-{quant}.gguf"
            write_gguf(m, tmp / name, quant)
            (tmp / "Modelfile").write_text(modelfile(m.fmt, name, system))
    return ExportResult(format, str(out), size_of(out), round(time.perf_counter() - t0, 3), quant, cleaned + m.notes)
