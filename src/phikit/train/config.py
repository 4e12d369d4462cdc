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
    lora_layers: int | None = None  # LoRA on the last N decoder layers only (the backward stops below them); None = all
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
    cpu_bf16: bool | None = None  # on the CPU, the matrix products in bf16 under autocast (LoRA weights, optimizer, loss fp32); None = on where the CPU multiplies bf16 natively
    fp8: bool = False  # the frozen base's matrix products in FP8 inside the compiled layers (speedups/fp8.py; GPUs with FP8 tensor cores)
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
    recipe: str = "auto"  # auto (facts for question/answer .jsonl without context, unless lr/epochs/max_steps are given) | facts | none
    fact_paraphrases: int | None = None  # question phrasings per fact, from templates (data.FACT_TEMPLATES); None = 1 (the recipe sets it)
    replay: int | None = None  # prompts whose base-model answers are mixed in (train.replay); None = 0 (the recipe sets it)
    replay_grounded: int = 0  # grounded SQuAD train prompts whose base-model answers are mixed in too (train.replay)
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


# The fact-injection recipe (docs/train.md, benchmarks/quality/facts.py): settings under the config file and the flags.
FACTS_RECIPE = dict(lr=2e-3, epochs=5, micro_batch=8, grad_accum=1, val_split=0.0, max_seq=512, fact_paraphrases=4, replay=64,
                    replay_grounded=16)


def make_config(file: str | None = None, **overrides) -> TrainConfig:
    """Defaults, then the recipe's settings (see pick_recipe), then the config file, then `overrides`
    whose value is not None (flags win)."""
    values = read_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if pick_recipe(values) == "facts":
        values = {**FACTS_RECIPE, **values, "recipe": "facts"}
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
    if cfg.lora_layers is not None and cfg.lora_layers < 1:
        raise DataError(f"lora_layers (--lora-layers) is {cfg.lora_layers}: it must be at least 1 (LoRA on the last N decoder "
                        "layers); leave it out for every layer")
    if cfg.fact_paraphrases is not None and cfg.fact_paraphrases < 1:
        raise DataError(f"fact_paraphrases (--fact-paraphrases) is {cfg.fact_paraphrases}: it must be at least 1 (the question as written)")
    if cfg.replay is not None and cfg.replay < 0:
        raise DataError(f"replay (--replay) is {cfg.replay}: give 0 (none) or the number of prompts to mix in")
    if not 0 <= cfg.replay_grounded <= 64:
        raise DataError(f"replay_grounded (--replay-grounded) is {cfg.replay_grounded}: give 0 (none) up to 64 (the grounded prompts phikit ships)")
    if cfg.max_steps is None and not cfg.epochs > 0:
        raise DataError(f"epochs (--epochs) is {cfg.epochs}: it must be more than 0 (or give --max-steps)")


def pick_recipe(values: dict) -> str:
    """"facts" or "none" for settings `values` (file and flags): recipe "auto" is "facts" for question/answer
    .jsonl data without context (data.is_fact_data) when none of lr, epochs, max_steps is set, since a
    schedule of one's own is not mixed with the recipe's; `recipe: facts` applies it under any settings."""
    from .data import is_fact_data

    recipe = values.get("recipe", "auto")
    if recipe not in ("auto", "facts", "none"):
        raise DataError(f"recipe (--recipe) is {recipe!r}: use auto, facts or none")
    if recipe == "auto":
        own_schedule = any(values.get(k) is not None for k in ("lr", "epochs", "max_steps"))
        return "facts" if not own_schedule and is_fact_data(str(values.get("data", TrainConfig.data))) else "none"
    return recipe
