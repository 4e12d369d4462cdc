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


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Every default is None here so that only the flags a user gives override the config file;
    # the real defaults live in phikit.train.config.TrainConfig (shown in brackets).
    p.add_argument("--data", help="training data: SQuAD 2.0 .json, .jsonl (messages | context+question+answer | text), or 'squad2'")
    p.add_argument("--out", help="output directory (adapter, phikit.json, log.jsonl, loss.png, checkpoints/) [phikit-adapter]")
    p.add_argument("--config", help="YAML or JSON file of settings (same names as the flags, with _); flags win")
    p.add_argument("--model", "-m", help="base model: registry name, HF directory, .gguf or hub id [embedded SmolLM2-135M]")
    p.add_argument("--quant", choices=["auto", "nf4", "none"], help="base weights: nf4 (QLoRA) or none [auto: nf4 on CUDA, none on CPU]")
    p.add_argument("--device", help="cpu | cuda | auto [auto]")
    p.add_argument("--format", help="chat format when it cannot be detected (chatml, phi3, phi4-mini, phi4)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, help="rank [16]")
    g.add_argument("--lora-alpha", type=int, help="[16]")
    g.add_argument("--lora-dropout", type=float, help="[0.05]")
    g.add_argument("--lora-targets", help="comma-separated module names [the registry's: all linear projections]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak learning rate, cosine decay [2e-4]")
    g.add_argument("--warmup-ratio", type=float, help="[0.1]")
    g.add_argument("--epochs", type=float, help="[3]")
    g.add_argument("--micro-batch", type=int, help="examples per forward pass [4]")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step; effective batch = micro x accum [2]")
    g.add_argument("--optimizer", choices=["auto", "adamw8bit", "adamw"], help="[auto: 8-bit AdamW on CUDA, AdamW on CPU]")
    g.add_argument("--weight-decay", type=float, help="[0.01]")
    g.add_argument("--max-seq", type=int, help="longer examples get their context cut, never the answer [2048]")
    g.add_argument("--group-by-length", type=_bool, metavar="BOOL", help="[true]")
    g.add_argument("--gradient-checkpointing", type=_bool, metavar="BOOL", help="[on for CUDA, off on CPU]")
    g.add_argument("--compile", type=_bool, metavar="BOOL", help="torch.compile each decoder layer (with offloaded activations) [on for CUDA]")
    g.add_argument("--offload-activations", type=_bool, metavar="BOOL",
                   help="keep checkpointed layer inputs, and an untied frozen input embedding, in CPU memory [on with checkpointing on CUDA, one process]")
    g.add_argument("--seed", type=int, help="[42]")
    g = p.add_argument_group("data and run")
    g.add_argument("--limit", type=int, help="use the first N examples")
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    g.add_argument("--val-split", type=float, help="fraction held out for eval loss [0.05]")
    g.add_argument("--val-data", help="separate validation file (instead of --val-split)")
    g.add_argument("--squad-answerable-ratio", type=float, help="SQuAD: answerable per unanswerable example, e.g. 2")
    g.add_argument("--squad-max-context-words", type=int, help="SQuAD: skip paragraphs longer than this (cheaper CPU runs)")
    g.add_argument("--squad-questions-per-context", type=int,
                   help="SQuAD: up to N questions of a paragraph in one conversation (follow-up turns) [1]")
    g.add_argument("--save-every", type=int, help="optimizer steps between checkpoints [50]")
    g.add_argument("--keep-last", type=int, help="checkpoints kept [2]")
    g.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --out")
    g = p.add_argument_group("several GPUs (data parallel, torch DDP or FSDP)")
    g.add_argument("--gpus", type=int, help="train in N processes through torchrun: one per GPU on CUDA, N gloo processes with "
                   "--device cpu; global batch = micro x accum x N. Under torchrun / accelerate launch, leave it out")
    g.add_argument("--strategy", choices=["ddp", "fsdp"], help="with several processes: ddp (a whole model each) or fsdp "
                   "(16-bit weights sharded over the processes after loading: more memory for activations; not with --quant nf4) [ddp]")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def run(args) -> int:
    import os

    from ..errors import PhikitError
    from ..train import make_config, train
    from ..train.distributed import env_world, launch

    names = ("data", "out", "model", "quant", "device", "format", "lora_r", "lora_alpha", "lora_dropout", "lr",
             "warmup_ratio", "epochs", "micro_batch", "grad_accum", "optimizer", "weight_decay", "max_seq",
             "group_by_length", "gradient_checkpointing", "offload_activations", "compile", "seed", "limit", "max_steps", "val_split", "val_data",
             "squad_answerable_ratio", "squad_max_context_words", "squad_questions_per_context", "save_every", "keep_last", "resume", "strategy", "progress")
    flags = {n: getattr(args, n) for n in names}
    if args.lora_targets:
        flags["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    cfg = make_config(args.config, **flags)
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


if __name__ == "__main__":  # a process started by `phikit train --gpus N` (phikit.train.distributed.launch)
    import sys

    from ..train.distributed import worker

    sys.exit(worker(sys.argv[1]))
