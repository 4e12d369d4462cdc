"""`phikit train`: LoRA / QLoRA fine-tuning; the result DIR is a standard PEFT adapter plus phikit.json."""

from __future__ import annotations

import argparse
import json


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _names(s: str) -> list[str] | None:
    """A comma-separated list of names ("" = not given)."""
    return [t.strip() for t in s.split(",") if t.strip()] if s else None


# One flag per TrainConfig field (config_fields()), `--lora-r` for lora_r, typed from the field's
# annotation. Below is only what a field cannot say: the help (in `--help`'s groups and order; [x] is
# TrainConfig's default) and argparse details. A field not listed still gets its flag, at the end,
# with its default as help; one in CONFIG_ONLY is set in a config file only.
HELP: dict[str | None, dict[str, str]] = {
    None: {
        "data": "training data: SQuAD 2.0 .json, .jsonl (messages | context+question+answer | text), or 'squad2'",
        "out": "output directory (adapter, phikit.json, log.jsonl, loss.png, checkpoints/) [phikit-adapter]",
        "model": "base model: registry name, HF directory, .gguf or hub id [embedded SmolLM2-135M]",
        "quant": "base weights: nf4 (QLoRA), nf4-dynamic (NF4 but its most sensitive layers in 16-bit: docs/quantize.md) "
                 "or none [auto: nf4 on CUDA, none on CPU; a folder saved by `phikit quantize` loads as saved]",
        "llamafy": "train a Phi-3-family base in its Llama layout (converted once into OUT/base-llama): q/k/v and "
                   "gate/up get LoRA of their own [false]",
        "device": "cpu | cuda | auto [auto]",
        "format": "chat format when it cannot be detected (chatml, phi3, phi4-mini, phi4)",
    },
    "LoRA": {
        "lora_r": "rank [16]",
        "lora_alpha": "[16]",
        "lora_dropout": "[0.05]",
        "lora_targets": "comma-separated module names [the registry's: all linear projections]",
        "lora_layers": "LoRA on the last N decoder layers only; the backward pass stops below them [all layers]",
    },
    "optimisation": {
        "lr": "peak learning rate, cosine decay [2e-4]",
        "warmup_ratio": "[0.1]",
        "epochs": "[3]",
        "micro_batch": "examples per forward pass [4]",
        "grad_accum": "micro-batches per optimizer step; effective batch = micro x accum [2]",
        "optimizer": "[auto: 8-bit AdamW on CUDA, AdamW on CPU]",
        "weight_decay": "[0.01]",
        "max_grad_norm": "clip the gradient norm to this (0 = no clipping) [1.0]",
        "max_seq": "longer examples get their context cut, never the answer [2048]",
        "group_by_length": "[true]",
        "gradient_checkpointing": "[on for CUDA, off on CPU]",
        "compile": "torch.compile each decoder layer (with offloaded activations) [on for CUDA]",
        "cpu_bf16": "on the CPU, the matrix products in bf16 under autocast, about twice as fast where the CPU has bf16 dot "
                    "products; LoRA weights, optimizer and loss stay fp32 [on with AVX512_BF16 or AMX]",
        "fp8": "the frozen base's matrix products in FP8 (e4m3, a scale per row), LoRA and the loss in bf16; "
               "needs the compiled NF4 path and FP8 tensor cores (H100, H200, Ada) [false]",
        "offload_activations": "keep checkpointed layer inputs, and an untied frozen input embedding, in CPU memory "
                               "[on with checkpointing on CUDA, one process]",
        "seed": "[42]",
    },
    "data and run": {
        "limit": "use the first N examples",
        "max_steps": "stop after N optimizer steps",
        "val_split": "fraction held out for eval loss [0.05]",
        "val_data": "separate validation file (instead of --val-split)",
        "eval_every_epoch": "eval loss on the validation examples at the end of each epoch [true]",
        "recipe": "facts: the fact-injection recipe (examples/facts_recipe.yaml: phrasings, replay, lr, epochs); "
                  "auto picks it for question/answer .jsonl without context when no --lr/--epochs/--max-steps is given [auto]",
        "fact_paraphrases": "question phrasings per fact, from templates (the facts recipe: 4) [1]",
        "replay": "prompts whose base-model answers are trained on beside the facts, to keep other answers (the facts recipe: 64) [0]",
        "replay_grounded": "grounded prompts (a SQuAD train paragraph and a question) whose base-model answers are trained on too, "
                           "to keep answering from a context (the facts recipe: 16) [0]",
        "squad_answerable_ratio": "SQuAD: answerable per unanswerable example, e.g. 2",
        "squad_max_context_words": "SQuAD: skip paragraphs longer than this (cheaper CPU runs)",
        "squad_questions_per_context": "SQuAD: up to N questions of a paragraph in one conversation (follow-up turns) [1]",
        "save_every": "optimizer steps between checkpoints [50]",
        "keep_last": "checkpoints kept [2]",
        "resume": "continue from the last checkpoint in --out",
        "progress": "no progress bar",
    },
    "several GPUs (data parallel, torch DDP or FSDP)": {
        "strategy": "with several processes: ddp (a whole model each) or fsdp (16-bit weights sharded over the processes "
                    "after loading: more memory for activations; not with --quant nf4) [ddp]",
    },
}
ARGS: dict[str, dict] = {  # argparse keywords beyond type and help
    "model": {"flags": ("--model", "-m")},
    "quant": {"choices": ["auto", "nf4", "nf4-dynamic", "none"]},
    "recipe": {"choices": ["auto", "facts", "none"]},
    "optimizer": {"choices": ["auto", "adamw8bit", "adamw"]},
    "strategy": {"choices": ["ddp", "fsdp"]},
    "resume": {"action": "store_true"},
    "progress": {"flags": ("--no-progress",), "action": "store_false"},
}
CONFIG_ONLY = {"extra"}  # free-form notes recorded in phikit.json
TYPES = {"str": str, "int": int, "float": float, "bool": _bool, "list[str]": _names}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Every default is None here so that only the flags a user gives override the config file;
    # the real defaults live in phikit.train.config.TrainConfig.
    from ..train.config import TrainConfig, config_fields

    p.add_argument("--config", help="YAML or JSON file of settings (same names as the flags, with _); flags win")
    fields = config_fields()
    listed = {n for helps in HELP.values() for n in helps}
    unlisted = {n: f"[{_shown(getattr(TrainConfig(), n))}]" for n in fields if n not in listed | CONFIG_ONLY}
    groups = {None: p}
    for title, helps in [*HELP.items(), (None, unlisted)]:
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        for name, text in helps.items():
            kw = dict(ARGS.get(name, {}))
            flags = kw.pop("flags", ("--" + name.replace("_", "-"),))
            if "action" not in kw:
                kw["type"] = TYPES[_kind(fields[name])]
                if kw["type"] is _bool:
                    kw["metavar"] = "BOOL"
            groups[title].add_argument(*flags, dest=name, default=None, help=text, **kw)
    groups["several GPUs (data parallel, torch DDP or FSDP)"].add_argument(
        "--gpus", type=int, help="train in N processes through torchrun: one per GPU on CUDA, N gloo processes with "
        "--device cpu; global batch = micro x accum x N. Under torchrun / accelerate launch, leave it out")


def _kind(annotation) -> str:
    """The key into TYPES for a field's annotation: "int" for int and int | None, "list[str]" for list[str] | None."""
    return (annotation.__name__ if isinstance(annotation, type) else str(annotation)).removesuffix(" | None")


def _shown(default) -> str:
    return str(default).lower() if isinstance(default, bool) else str(default)


def config_from(args):
    """The TrainConfig the command asks for: defaults, then the --config file, then the flags given."""
    from ..train.config import config_fields, make_config

    return make_config(args.config, **{n: getattr(args, n) for n in config_fields() if n not in CONFIG_ONLY})


def run(args) -> int:
    import os

    from ..errors import PhikitError
    from ..train import train
    from ..train.distributed import env_world
    from ..train.launch import launch

    cfg = config_from(args)
    if args.gpus is not None and args.gpus < 1:
        raise PhikitError("--gpus must be at least 1")
    if args.gpus and args.gpus > 1 and env_world() is None:
        rc = launch(cfg, args.gpus)
        meta = os.path.join(cfg.out, "phikit.json")
        if rc != 0 or not os.path.isfile(meta):
            raise PhikitError(f"training in {args.gpus} processes failed (torchrun exit status {rc}): see the messages above")
        with open(meta) as f:
            summary = json.load(f)
    else:
        summary = train(cfg)
        if (env_world() or (0,))[0] != 0:  # under torchrun only rank 0 reports
            return 0
    keys = ("base_model", "format", "steps", "train_s", "tokens_per_s", "final_train_loss", "eval_loss", "optimizer")
    print(json.dumps({k: summary[k] for k in keys} | {"adapter": cfg.out, "examples": summary["data"]["train_examples"],
                                                        "truncated": summary["data"]["truncated"]}))
    return 0


if __name__ == "__main__":  # a process started by `phikit train --gpus N` (phikit.train.launch.launch)
    import sys

    from ..train.launch import worker

    sys.exit(worker(sys.argv[1]))
