"""GPTQ-compatible 4-bit export through auto-round (Intel's SignRound), and loading it back.

The merged model (merge.py) is quantised block by block with AutoRound, calibrated
on the user's text (`--calib`, the files `phikit train` reads), else the adapter's
recorded training data, else the shared SQuAD 2.0 train set when it is present.
auto-round's own default calibration set comes from the Hugging Face Hub, which an
offline machine cannot reach, so it is never used. The output (`quant_method: gptq`,
auto-round's `auto_gptq` packing) is what vLLM serves at 4-bit:
`vllm serve OUT` (vLLM reads the method from config.json).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, PhikitError, require

log = logging.getLogger("phikit")

BITS = (2, 3, 4, 8)  # the bit widths GPTQ kernels (and vLLM's gptq method) know
GROUP_SIZES = (-1, 32, 64, 128)  # -1: one scale per output channel


@dataclass
class GPTQSettings:
    """AutoRound settings. The defaults are auto-round's recommended ones except seqlen
    (512 rather than 2048: fine-tuning data are short chat examples, and 128 x 2048
    tokens is more text than a small training set holds) and iters without a GPU."""

    bits: int = 4
    group_size: int = 128
    # SignRound steps per block; 0 = auto-round's optimised round-to-nearest. None: 200
    # (auto-round's default) with a CUDA GPU, else 0: on a CPU 200 steps take hours, and
    # 20 steps kept fewer top-1 tokens than 0 did (docs/export.md, Measured).
    iters: int | None = None
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    seed: int = 42

    def check(self) -> None:
        if self.bits not in BITS:
            raise PhikitError(f"--bits {self.bits}: GPTQ export supports {', '.join(map(str, BITS))} bits")
        if self.group_size not in GROUP_SIZES:
            raise PhikitError(f"--group-size {self.group_size}: use one of {', '.join(map(str, GROUP_SIZES))} (-1 = per channel)")
        if (self.iters is not None and self.iters < 0) or self.nsamples < 1 or self.seqlen < 8:
            raise PhikitError("--iters must be >= 0, --nsamples >= 1 and --seqlen >= 8")


def calibration_source(calib: str | None, adapter: str | None) -> tuple[Path, str]:
    """The calibration file and a sentence saying where it came from.

    Order: `calib`; the training data recorded in the adapter's phikit.json (if the
    file is still there); the shared SQuAD 2.0 train set; else a PhikitError asking for --calib.
    """
    from ..train.data import resolve_data_path

    if calib:
        return resolve_data_path(calib), f"calibrated on {calib}"
    if adapter:
        meta = Path(adapter) / "phikit.json"
        data = json.loads(meta.read_text()).get("data") if meta.is_file() else None
        if isinstance(data, dict) and data.get("path") and Path(data["path"]).is_file():
            return Path(data["path"]), f"calibrated on the adapter's training data {data['path']}"
    try:
        p = resolve_data_path("squad2")
    except DataError:
        raise PhikitError(
            "GPTQ export needs calibration text: pass --calib FILE (a .jsonl of text / messages / "
            "context+question+answer records, or a SQuAD 2.0 .json), ideally your training data"
        ) from None
    return p, f"calibrated on the shared SQuAD 2.0 train set {p} (no --calib given)"


def calibration_blocks(path: Path, tok, fmt, settings: GPTQSettings) -> tuple[list, list[str]]:
    """Up to `nsamples` blocks of `seqlen` tokens ([1, seqlen] tensors) from the examples in
    `path`, each rendered exactly as `phikit train` renders it (chat format, BOS, EOS)."""
    import torch

    from ..train.data import Tokenised, read_examples

    examples = read_examples(path)
    random.Random(settings.seed).shuffle(examples)  # SQuAD files are ordered by article
    enc = Tokenised(tok, fmt, max_seq=10**9)  # no truncation: blocks are cut from one stream
    need = settings.nsamples * settings.seqlen
    stream: list[int] = []
    for ex in examples:
        got = enc.encode(ex)
        if got:
            stream += got[0]
            if ex.text is None and tok.eos_token_id is not None:
                stream.append(tok.eos_token_id)  # a document boundary between chat examples
        if len(stream) >= need:
            break
    n = len(stream) // settings.seqlen
    if n == 0:
        raise PhikitError(
            f"{path} gives {len(stream)} tokens of calibration text, fewer than one block of --seqlen "
            f"{settings.seqlen}: pass more text with --calib or a smaller --seqlen"
        )
    notes = []
    if n < settings.nsamples:
        notes.append(f"calibration: {path} fills {n} blocks of {settings.seqlen} tokens, not the {settings.nsamples} asked for")
    blocks = [torch.tensor([stream[i * settings.seqlen : (i + 1) * settings.seqlen]]) for i in range(min(n, settings.nsamples))]
    return blocks, notes


def write_gptq(m, out: Path, settings: GPTQSettings, calib_path: Path, calib_note: str) -> list[str]:
    """Quantise the merged model `m` (in place) with AutoRound and write the GPTQ directory `out`
    (weights, config with quantization_config, fixed tokenizer + chat template, phikit.json)."""
    import torch

    auto_round = require("auto_round", "auto-round", why="--format gptq quantises with auto-round")
    settings.check()
    if settings.iters is None:
        settings.iters = 200 if torch.cuda.is_available() else 0
    check_group_size(m.model, settings.group_size)
    blocks, notes = calibration_blocks(calib_path, m.tokenizer, m.fmt, settings)
    notes.insert(0, f"{calib_note}: {len(blocks)} x {settings.seqlen} tokens, {settings.iters} AutoRound iterations")
    work = out.parent / f"{out.name}.autoround"
    ar = auto_round.AutoRound(
        m.model,
        m.tokenizer,
        scheme=f"W{settings.bits}A16",
        bits=settings.bits,
        group_size=settings.group_size,
        sym=True,  # vLLM's GPTQ (Marlin) kernels need symmetric quantisation
        iters=settings.iters,
        nsamples=len(blocks),
        seqlen=settings.seqlen,
        batch_size=min(settings.batch_size, len(blocks)),
        dataset=blocks,
        # device_map left at auto-round's default (0): the first accelerator when there is one, else the CPU.
        enable_torch_compile=False,  # compiling costs more than it saves on small models
        seed=settings.seed,
    )
    try:
        _, folders = ar.quantize_and_save(str(work), format="auto_gptq")
        # auto-round adds a "<model>-w4g128" folder under the directory it is given: lift its files up.
        src = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)
        shutil.move(str(src), str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _fp32_to_fp16(out)
    # Replace auto-round's copy of the tokenizer with the fixed one and phikit's chat template.
    m.tokenizer.chat_template = m.fmt.hf_template()
    m.tokenizer.save_pretrained(out)
    meta = {"base_model": m.spec.name, "source": m.spec.source, "adapter": m.adapter, "chat_format": m.fmt.name,
            "format": "gptq", "quantization": {**settings.__dict__, "calibration": str(calib_path)}, "notes": m.notes + notes}
    (out / "phikit.json").write_text(json.dumps(meta, indent=2))
    return notes


def check_group_size(model, group_size: int) -> None:
    """Refuse a group size that does not divide every quantised layer's input width:
    GPTQ kernels (vLLM's included) need whole groups."""
    import torch

    if group_size <= 0:
        return
    widths = {mod.in_features for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        ok = [g for g in GROUP_SIZES if g > 0 and all(w % g == 0 for w in widths)]
        raise PhikitError(
            f"--group-size {group_size} does not divide the layer width(s) {', '.join(map(str, bad))} of this model: "
            f"use {' or '.join(map(str, ok + [-1]))}"
        )


def _fp32_to_fp16(out: Path) -> None:
    """auto-round leaves the unquantised tensors (embeddings, lm_head, norms) in the model's
    fp32; GPTQ checkpoints and vLLM's GPTQ kernels are fp16, and fp32 doubles the file."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in out.glob("*.safetensors"):
        state = load_file(str(f))
        if any(t.dtype == torch.float32 for t in state.values()):
            state = {k: t.to(torch.float16) if t.dtype == torch.float32 else t for k, t in state.items()}
            save_file(state, str(f), metadata={"format": "pt"})


def load_gptq(path: str | Path):
    """Load a GPTQ export on the CPU: (model, tokenizer). Plain transformers asks for optimum
    and gptqmodel for quant_method gptq; auto-round's own kernels (AutoRoundConfig) run on the CPU."""
    require("auto_round", "auto-round", why="loading a GPTQ export on the CPU")
    from transformers import AutoModelForCausalLM, AutoRoundConfig, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=AutoRoundConfig(backend="auto"), device_map="cpu")
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers and say why they are prime.",
]


def top1_agreement(source, quantised, tok, fmt, prompts: list[str] = PROMPTS) -> dict:
    """Share of positions where the quantised model's next-token argmax equals the source's,
    over each prompt rendered with the chat format (every position, not just the last)."""
    import torch

    agree = total = 0
    for p in prompts:
        text = fmt.render([{"role": "user", "content": p}], add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            a = source(ids).logits[0].float().argmax(-1)
            b = quantised(ids).logits[0].float().argmax(-1)
        agree += int((a == b).sum())
        total += ids.shape[1]
    return {"top1_agree": round(agree / total, 4), "positions": total}
