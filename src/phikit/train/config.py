"""The training configuration: the tutorials' LoRA/QLoRA recipe as defaults,
overridable by a YAML/JSON file and then by command-line flags (flags win)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import DataError


@dataclass
class TrainConfig:
    data: str = "squad2"  # a .json (SQuAD 2.0) / .jsonl file, or "squad2" for the shared SQuAD 2.0 train set
    out: str = "phikit-adapter"
    model: str | None = None  # registry name, HF dir, .gguf or hub id; None = the embedded default
    quant: str = "auto"  # nf4 | none | auto (nf4 on CUDA when the weights are not GGUF, else none)
    device: str = "auto"
    format: str | None = None  # chat format, when it cannot be detected
    llamafy: bool = False  # a Phi model trained in its Llama layout (OUT/base-llama): q/k/v and gate/up LoRA of their own
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None = the registry's targets for the model (all linear projections)
    # optimisation
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    epochs: float = 3
    micro_batch: int = 4
    grad_accum: int = 2  # effective batch = micro_batch * grad_accum
    optimizer: str = "auto"  # auto (8-bit AdamW where bitsandbytes runs on the device, else AdamW) | adamw8bit | adamw
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq: int = 2048
    group_by_length: bool = True
    gradient_checkpointing: bool | None = None  # None = on for CUDA, off on CPU (where memory is not the limit)
    compile: bool | None = None  # torch.compile each decoder layer (one shared region) on the offloaded path; None = on for CUDA
    offload_activations: bool | None = None  # checkpointed layer inputs (and an untied frozen input embedding) wait in CPU memory; None = on with checkpointing on CUDA, one process
    seed: int = 42
    # data
    limit: int | None = None  # first N examples (after balancing)
    max_steps: int | None = None  # stop after N optimizer steps (the schedule then spans N steps)
    val_split: float = 0.05
    val_data: str | None = None
    squad_answerable_ratio: float | None = None  # e.g. 2.0 = two answerable per unanswerable; None = as in the file
    squad_max_context_words: int | None = None  # skip SQuAD paragraphs longer than this (cheaper CPU recipes)
    squad_questions_per_context: int = 1  # >1: several questions of a paragraph in one conversation (data.read_squad)
    # checkpoints and logs
    save_every: int = 50  # optimizer steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    resume: bool = False
    strategy: str = "ddp"  # several processes: ddp (each holds the whole model) | fsdp (16-bit weights sharded over them)
    eval_every_epoch: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes recorded in phikit.json

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def to_dict(self) -> dict:
        return asdict(self)


def config_fields() -> dict[str, type]:
    return {f.name: f.type for f in fields(TrainConfig)}


def read_config_file(path: str) -> dict:
    """Settings from a YAML (.yaml/.yml) or JSON file; DataError on a bad file or an unknown key."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"config file {path} not found")
    from ..errors import decode_utf8

    text = decode_utf8(p.read_bytes(), str(p))
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both are the user's file
        raise DataError(f"config file {path} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"config file {path} must hold a mapping of setting -> value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = set(data) - set(config_fields())
    if unknown:
        raise DataError(f"config file {path}: unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(config_fields()))}")
    return data


def make_config(file: str | None = None, **overrides) -> TrainConfig:
    """Defaults, then the config file, then `overrides` whose value is not None (flags win)."""
    values = read_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """DataError for a setting out of its range (make_config and the training loop check)."""
    if cfg.micro_batch < 1 or cfg.grad_accum < 1:
        raise DataError("micro_batch and grad_accum must be at least 1")
    if not 0 <= cfg.val_split < 1:
        raise DataError("val_split must be in [0, 1)")
    if cfg.limit is not None and cfg.limit < 1:
        raise DataError(f"limit (--limit) is {cfg.limit}: it must be at least 1 (the first N examples); "
                        "leave it out to train on every example")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise DataError(f"max_steps (--max-steps) is {cfg.max_steps}: it must be at least 1, since 0 steps would train "
                        "nothing; leave it out to train for --epochs")
    if cfg.max_steps is None and not cfg.epochs > 0:
        raise DataError(f"epochs (--epochs) is {cfg.epochs}: it must be more than 0 (or give --max-steps)")
