"""The LoRA / QLoRA training loop: one readable loop (no HF Trainer), in the
spirit of torchtune and nanochat, so every step a user asks about is in view.

    setup(cfg) -> Run:  data -> load (phikit) -> LoRA (peft) + speed-ups (speedups/, as
           SpeedOptions say) -> optimizer, schedule -> resume
    train(cfg):  setup, then for each optimizer step: Step (step.py: accumulate micro-batches,
           clip, step, schedule) -> log (the loss read one step late) -> eval loss each epoch,
           checkpoint; then finish(run)
    finish(run): adapter + phikit.json + the last checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

from ..errors import DataError, PhikitError
from .checkpoint import fsync_dir, fsync_file, list_checkpoints, load_checkpoint, save_checkpoint, write_text_atomic
from .config import TrainConfig, check_config
from .data import Tokenised, batch_order, collate, expand_facts, file_hash, read_examples, resolve_data_path
from .distributed import Dist, check_strategy, decoder_layers
from .logs import TrainLog
from .speedups import SpeedOptions, autocast as make_autocast, flat_params
from .step import Readback, Step, count_labels, lm_loss, on_device

log = logging.getLogger("phikit")


def _pick_quant(cfg: TrainConfig, spec, device: str) -> str:
    from ..models.dynamic4 import prequantized

    if prequantized(spec.path):  # saved in 4-bit (phikit quantize): it loads as saved, so this is QLoRA
        if cfg.quant not in ("auto", "nf4", "nf4-dynamic"):
            log.warning("%s is saved in NF4: training QLoRA on it (--quant %s does not apply)", spec.path, cfg.quant)
        return "nf4"
    if cfg.quant != "auto":
        return cfg.quant
    if cfg.strategy == "fsdp":  # FSDP shards 16-bit weights only (check_strategy)
        return "none"
    return "nf4" if device.startswith("cuda") and not spec.gguf_file else "none"


def _make_optimizer(cfg: TrainConfig, params, speed: SpeedOptions):
    """8-bit AdamW (bitsandbytes) where `speed` says (CUDA); torch AdamW elsewhere, since bitsandbytes' 8-bit optimizers need a GPU."""
    import torch

    want = cfg.optimizer
    if speed.adamw8bit:
        try:
            from .speedups.adamw8bit import adamw8bit

            return adamw8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "adamw8bit"
        except Exception as e:  # bitsandbytes missing or without a CUDA build: the fallback is noted in the log
            if want == "adamw8bit":
                raise PhikitError(f"--optimizer adamw8bit needs bitsandbytes with CUDA ({e}); use --optimizer adamw") from None
            note = f"8-bit AdamW unavailable ({type(e).__name__}); using torch AdamW"
    elif want == "adamw8bit":
        raise PhikitError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use --optimizer adamw")
    else:
        note = "torch AdamW" + (" (8-bit AdamW runs on CUDA only)" if want == "auto" else "")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), note


def prepare_lora(model, cfg: TrainConfig, spec, quant: str, device: str, speed: SpeedOptions | None = None):
    """Wrap a loaded model with LoRA as `cfg` says (k-bit preparation for nf4, optional gradient checkpointing)
    and apply the speed-ups `speed` asks for (default: SpeedOptions.for_run(cfg, device)); returns
    (peft model in train mode, target module names, speedups.Speedups: what they made).

    On CUDA the weights that are not quantised stay bf16. peft's
    prepare_model_for_kbit_training would make them fp32: for Phi-4-mini that is its
    200k x 3072 embedding (1.2 GB more) and an fp32 residual stream (twice the
    activation traffic), while autocast computes the matmuls in bf16 either way.
    On the CPU the weights are fp32; autocast computes in bf16 where `speed.cpu_bf16` (speedups.autocast).
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from . import speedups

    cuda = device.startswith("cuda")
    speed = speed or speedups.SpeedOptions.for_run(cfg, device)
    layers = decoder_layers(model) if speed.offload else None
    if speed.offload and layers is None:
        log.warning("%s: no decoder layer list found, so activations are checkpointed on the GPU (not offloaded)", type(model).__name__)
        speed = dataclasses.replace(speed, offload=False, compile=False, host_embedding=False)
    gc, offload = speed.checkpointing, speed.offload
    if quant in ("nf4", "nf4-dynamic") and not cuda:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc and not offload,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc and not offload:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    targets = _lora_targets(model, cfg, spec)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM",
                      layers_to_transform=_last_layers(model, cfg.lora_layers))
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, lcfg)
    made = speedups.apply(model, layers, speed)
    if made.host_bytes:  # an untied frozen input embedding went to CPU memory with the activations
        log.info("input embedding in pinned CPU memory: %.2f GB of GPU memory freed", made.host_bytes / 1e9)
    if cfg.compile and not offload:
        log.warning("--compile applies to the offloaded-activation path only (on with checkpointing on CUDA, one process); not compiling")
    model.train()
    return model, targets, made


def _last_layers(model, n: int | None) -> list[int] | None:
    """The indices of the last `n` decoder layers (peft's layers_to_transform), or None for all of them."""
    if n is None:
        return None
    total = model.config.num_hidden_layers
    if not 1 <= n <= total:
        raise PhikitError(f"--lora-layers must be between 1 and the model's {total} decoder layers, got {n}")
    return list(range(total - n, total))


def _lora_targets(model, cfg: TrainConfig, spec) -> list[str]:
    """The configured targets, else the registry's for the model; for a model outside the
    registry (whose spec carries the llama names) the family's names that the model really has."""
    import torch

    from ..models.registry import LLAMA_LORA_TARGETS, PHI_LORA_TARGETS

    have = {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    if cfg.lora_targets:
        missing = set(cfg.lora_targets) - have
        if missing:
            raise PhikitError(f"--lora-targets {', '.join(sorted(missing))} not in the model; its linear layers: {', '.join(sorted(have))}")
        return list(cfg.lora_targets)
    for names in (spec.lora_targets, PHI_LORA_TARGETS, LLAMA_LORA_TARGETS):
        if set(names) <= have:
            return list(names)
    return sorted(have - {"lm_head"})


def _split(examples: list, cfg: TrainConfig) -> tuple[list, list]:
    if cfg.val_data:
        return examples, read_examples(resolve_data_path(cfg.val_data), seed=cfg.seed)
    n_val = int(len(examples) * cfg.val_split) if cfg.val_split > 0 else 0
    if cfg.val_split > 0 and len(examples) >= 10:
        n_val = max(1, n_val)
    idx = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(idx)
    val = set(idx[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def evaluate_loss(model, items, cfg: TrainConfig, pad_id: int, device: str, autocast, dist: Dist | None = None, fwd=None,
                  loss=lm_loss) -> float | None:
    """Mean per-token loss on the validation items (each process of a multi-process run scores its share).
    `loss`: lm_loss, as the run's speed-ups set it up. Under FSDP the loss runs through the sharded root `fwd`,
    and every rank as many passes as the others."""
    import torch

    if not items:
        return None
    dist = dist or Dist()
    model.eval()
    total, n = 0.0, 0
    batches = batch_order([len(i) for i, _ in items], cfg.micro_batch, 0, 0, True)
    work = dist.micro_batches(batches) if dist.fsdp else [(b, True) for b in dist.shard(batches)]
    with torch.no_grad():
        for b, real in work:
            chunk = [items[i] for i in b]
            ids, att, lab = on_device(device, *collate(chunk, pad_id), labels=dist.fsdp)  # FSDP wraps the loss
            value = fwd(ids, att, lab) if dist.fsdp else loss(model, ids, att, lab, autocast)
            if real:
                total += float(value)
                n += count_labels(chunk)
    total, n = dist.all_sum(total, n)
    model.train()
    return total / max(n, 1)


def _write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def peft_base(spec) -> str | None:
    """The base to name in adapter_config.json, one plain peft (`AutoPeftModelForCausalLM`) can load: a Hugging
    Face directory or hub id. A GGUF file (the embedded default's folder holds only that) is named by the hub id
    of its registry entry instead; None keeps what peft wrote."""
    if spec.gguf_file and not spec.path:
        return spec.hub_id
    return None


def save_adapter(model, out: Path, meta: dict, weights: dict | None = None, tokenizer=None, base: str | None = None) -> None:
    """The standard PEFT adapter files plus phikit.json, each moved into `out` only once written in full and
    fsynced, so that no rename can leave an empty or short file under its name after a crash; phikit.json comes
    last: an adapter folder without it (or with the previous run's) was not finished.
    `weights`: the trainable weights gathered in full from an FSDP-sharded model (its own are shards).
    `tokenizer`: saved beside the adapter (with its fixes), so the folder loads on its own; `base`: the
    base_model_name_or_path to record instead of peft's (see `peft_base`)."""
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    if base:
        cfg_file = tmp / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = base
        cfg_file.write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    files = sorted(tmp.iterdir(), key=lambda f: (not f.name.startswith("adapter_model"), f.name))  # the weights first
    for f in files:
        fsync_file(f)
    fsync_dir(tmp)
    for f in files:
        os.replace(f, out / f.name)
    fsync_dir(out)
    tmp.rmdir()
    _write_json_atomic(out / "phikit.json", meta)


_NOTHING_TO_TRAIN = "{path}: no example has any trainable token ({why}): give the records text, or assistant answers, to train on"


def check_inputs(cfg: TrainConfig) -> tuple[Path, list, list, list[Path]]:
    """Read and check all the data, and refuse to overwrite a run, before the (slow) model load, so a bad line fails fast:
    (data path, train examples, validation examples, checkpoints in cfg.out). Raises DataError / PhikitError."""
    check_config(cfg)  # a TrainConfig made without make_config (the multi-process worker's)
    data_path = resolve_data_path(cfg.data)
    examples = read_examples(data_path, cfg.squad_answerable_ratio, cfg.squad_max_context_words, cfg.seed,
                             cfg.squad_questions_per_context)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    check_strategy(cfg.strategy, cfg.quant)
    train_ex, val_ex = _split(examples, cfg)
    train_ex = expand_facts(train_ex, cfg.fact_paraphrases or 1, cfg.seed)  # after the split: no phrasing of a validation fact is trained on
    if not train_ex:
        raise DataError(f"{data_path}: no training examples left after the validation split")
    if all(e.text == "" for e in train_ex):  # the tokenised check in train() catches the rest, after the model load
        raise DataError(_NOTHING_TO_TRAIN.format(path=data_path, why="every record's 'text' is empty"))
    ckpts = list_checkpoints(Path(cfg.out))
    if ckpts and not cfg.resume:
        raise PhikitError(f"{cfg.out} already holds checkpoints of a run: pass --resume to continue it, or choose another --out")
    return data_path, train_ex, val_ex, ckpts


def _save(dist: Dist, out: Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int, full: tuple | None = None) -> None:
    """A checkpoint written by rank 0 alone (with every rank's RNG state); the others wait until it is whole.
    `full`: FSDP's gathered (weights, optimizer state), where the caller already holds them."""
    rngs = dist.rng_states()  # a collective: every rank takes part
    if full is None and dist.fsdp:
        full = dist.trainable_state(model, optimizer)  # also a collective
    if dist.is_main:
        save_checkpoint(out, step, model, optimizer, scheduler, dict(state), keep_last, rng_ranks=rngs, fsdp_state=full)
    dist.barrier()


def _llamafied(spec, out: Path, dist: Dist, loaded):
    """The spec of the Llama-layout copy to train on: rank 0 makes it while the others check the model, then wait."""
    from ..models.llamafy import training_copy

    if loaded is not None:
        raise PhikitError("--llamafy converts the base on disk before it loads: pass the model by name, not loaded")
    made = training_copy(spec, out, make=dist.is_main)
    dist.barrier()
    return made if dist.is_main else training_copy(spec, out)


@dataclasses.dataclass
class Run:
    """Everything setup made for one training run: what the loop and the summary read."""

    cfg: TrainConfig
    out: Path
    dist: Dist
    device: str
    spec: object  # models.registry.ModelSpec
    m: object  # the phikit Model (its backend holds model and tokenizer)
    quant: str
    data_path: Path
    enc: Tokenised
    train_items: list
    val_items: list
    pad_id: int
    targets: list[str]
    model: object  # the peft model
    autocast: object
    loss_fn: object
    fwd: object  # the loss as the process group runs it (Dist.wrap)
    params: list
    optimizer: object
    opt_note: str
    scheduler: object
    total: int  # optimizer steps of the whole run
    n_micro: int  # micro-batches an epoch
    state: dict  # step, epoch, micro, tokens, train_s: what a checkpoint saves
    step: Step
    tlog: TrainLog
    compute: str = "fp32"  # what the matrix products run in: "fp32", or "bf16 autocast" (speedups.autocast)


def setup(cfg: TrainConfig, loaded=None) -> Run:
    """Data, model, LoRA, speed-ups, optimizer, schedule and resume for `cfg` (see `train`)."""
    import torch

    import phikit

    from ..models.loading import resolve_device
    from ..models.registry import resolve

    out = Path(cfg.out)
    data_path, train_ex, val_ex, ckpts = check_inputs(cfg)
    spec = resolve(cfg.model)
    # Under torchrun / accelerate launch: join the process group; this rank's GPU is cuda:LOCAL_RANK.
    dist, device = Dist.from_env(resolve_device(cfg.device), cfg.strategy)
    if cfg.strategy == "fsdp" and not dist.ddp:
        log.warning("--strategy fsdp: a single process has nothing to shard; training as one process (use --gpus N or torchrun)")
    if cfg.llamafy:  # the base's Llama layout, converted once (models/llamafy.py), is what loads and trains
        spec = _llamafied(spec, out, dist, loaded)
    quant = _pick_quant(cfg, spec, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    m = loaded or phikit.load(spec.path if cfg.llamafy else cfg.model, backend="transformers", quant=quant, device=device, format=cfg.format)
    model, tok, fmt = m.backend.model, m.backend.tokenizer, m.fmt
    pad = fmt.pad or tok.pad_token
    pad_id = tok.convert_tokens_to_ids(pad)
    if pad_id is None or pad_id in {tok.convert_tokens_to_ids(s) for s in fmt.stop if s != pad} - {tok.unk_token_id}:
        raise PhikitError(f"{spec.name}: no usable pad token (format {fmt.name} says {pad!r})")

    if cfg.replay or cfg.replay_grounded:  # the base model's own answers, generated before any LoRA weight exists (train/replay.py)
        from .replay import replay_examples

        train_ex = train_ex + replay_examples(m, cfg.replay or 0, cfg.seed, grounded=cfg.replay_grounded)
    enc = Tokenised(tok, fmt, cfg.max_seq)
    train_items = [x for x in map(enc.encode, train_ex) if x is not None]
    val_items = [x for x in map(enc.encode, val_ex) if x is not None]
    if not train_items:
        raise DataError(f"{data_path}: no example fits max_seq={cfg.max_seq} even with its context cut; raise --max-seq")
    if not count_labels(train_items):  # the loss would be 0.0 at every step, and nothing learnt
        raise DataError(_NOTHING_TO_TRAIN.format(path=data_path, why="once tokenised, none has a token to predict"))
    if enc.truncated:
        log.warning("%d example(s) longer than max_seq=%d: context truncated (answers kept); %d dropped", enc.truncated, cfg.max_seq, enc.dropped)

    speed = SpeedOptions.for_run(cfg, device, dist.world)
    model, targets, made = prepare_lora(model, cfg, spec, quant, device, speed)
    autocast = make_autocast(device, made.options)
    compute = "fp32" if autocast is contextlib.nullcontext else "bf16 autocast"  # what make_autocast decided
    loss_fn = functools.partial(lm_loss, head_ce=made.head_ce)
    # FSDP replaces the parameters by their shards: shard before the optimizer takes them (DDP wraps after the resume).
    fwd = dist.wrap(model, loss_fn, autocast) if dist.fsdp else None
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    params = flat_params(params, speed)  # one tensor for the optimizer and clipping, not one per LoRA matrix
    optimizer, opt_note = _make_optimizer(cfg, params, speed)

    from transformers import get_cosine_schedule_with_warmup

    n_micro = math.ceil(len(train_items) / cfg.micro_batch)
    steps_per_epoch = math.ceil(n_micro / (cfg.grad_accum * dist.world))  # global batch: micro x accum x processes
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "epoch": 0, "micro": 0, "tokens": 0, "train_s": 0.0}
    if cfg.resume and ckpts:
        state = load_checkpoint(ckpts[-1], model, optimizer, scheduler, rank=dist.rank, dist=dist)
        log.warning("resumed from %s (step %d)", ckpts[-1], state["step"])
    elif cfg.resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    if dist.world > 1:
        state["world_size"] = dist.world
    if dist.fsdp:
        state["strategy"] = "fsdp"
    fwd = fwd or dist.wrap(model, loss_fn, autocast)  # after the resume: DDP starts from the restored weights
    step = Step(fwd, params, optimizer, scheduler, device=device, dist=dist, max_grad_norm=cfg.max_grad_norm)
    tlog = TrainLog(out, resume_step=state["step"] if cfg.resume else None, enabled=dist.is_main)
    tlog.write(event="start", total_steps=total, train_examples=len(train_items), val_examples=len(val_items),
               truncated=enc.truncated, dropped=enc.dropped, optimizer=opt_note, quant=quant, device=device,
               compute=compute, trainable_params=n_trainable)
    return Run(cfg, out, dist, device, spec, m, quant, data_path, enc, train_items, val_items, pad_id, targets, model,
               autocast, loss_fn, fwd, params, optimizer, opt_note, scheduler, total, n_micro, state, step, tlog, compute)


def train(cfg: TrainConfig, stop_after: int | None = None, loaded=None) -> dict:
    """Train a LoRA adapter as `cfg` says; returns a summary (also in DIR/phikit.json).

    `stop_after` ends the run after that many optimizer steps as if killed right
    after a checkpoint (the schedule still spans the whole run): for resume tests.
    `loaded`: a phikit Model already loaded for cfg.model (transformers backend)
    to train in place: LoRA layers are injected into its modules, so afterwards
    it generates with the adapter (the benchmark scores it without reloading).
    Raises DataError on bad data before any training starts.
    """
    r = setup(cfg, loaded)
    dist, state, tlog = r.dist, r.state, r.tlog
    bar = None
    if cfg.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=r.total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    step, epoch, micro = state["step"], state["epoch"], state["micro"]
    val_loss, val_step = None, None  # the last eval, and the step it was run at
    readback = Readback()
    lengths = [len(i) for i, _ in r.train_items]

    def write_logs() -> None:
        """The log lines of the steps whose loss has not been read yet."""
        for loss_sum, rec in readback.ready():
            (loss_sum,) = dist.all_sum(loss_sum)
            tlog.write(step=rec["step"], epoch=rec["epoch"], loss=round(loss_sum, 5), lr=rec["lr"], tokens_per_s=rec["tokens_per_s"])
            if bar:
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)

    def evaluate() -> float:
        return evaluate_loss(r.model, r.val_items, cfg, r.pad_id, r.device, r.autocast, dist, r.fwd, r.loss_fn)

    while step < r.total:
        batches = batch_order(lengths, cfg.micro_batch, cfg.seed, epoch, cfg.group_by_length)
        while micro < len(batches) and step < r.total:
            t0 = time.perf_counter()
            group = [[r.train_items[i] for i in b] for b in batches[micro : micro + cfg.grad_accum * dist.world]]
            mine = [(*collate(chunk, r.pad_id), real) for chunk, real in dist.micro_batches(group)]  # this rank's share (see Step)
            loss_sum = r.step(mine, sum(count_labels(g) for g in group))  # stays on the device until read (see Readback)
            (n_tok,) = dist.all_sum(sum(int(att.sum()) for _, att, _, real in mine if real))
            micro += len(group)
            step += 1
            lr = r.scheduler.get_last_lr()[0]
            write_logs()  # the previous step's line: this step is already queued on the GPU behind it
            dt = time.perf_counter() - t0
            readback.push(loss_sum, step=step, epoch=round(epoch + micro / len(batches), 4), lr=lr, tokens_per_s=round(n_tok / dt, 1))
            state.update(step=step, epoch=epoch, micro=micro, tokens=state["tokens"] + n_tok, train_s=state["train_s"] + dt)
            if micro >= len(batches):  # end of epoch: the checkpoint below then starts the next one
                if cfg.eval_every_epoch and r.val_items:
                    write_logs()  # the step's line before the eval's
                    val_loss, val_step = evaluate(), step
                    tlog.write(step=step, epoch=epoch + 1, eval_loss=round(val_loss, 5))
                epoch, micro = epoch + 1, 0
                state.update(epoch=epoch, micro=micro)
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop_after:
                write_logs()  # the log whole up to the checkpoint, which a resume starts from
                _save(dist, r.out, step, r.model, r.optimizer, r.scheduler, state, cfg.keep_last)
            if stop_after and step >= stop_after:
                if bar:
                    bar.close()
                tlog.plot()
                return {"stopped_at": step, "out": str(r.out)}
            if micro == 0:  # an epoch just ended: the outer loop draws the next epoch's order
                break
        if micro >= len(batches):
            epoch, micro = epoch + 1, 0
    write_logs()
    if bar:
        bar.close()
    if r.val_items and val_step != step:  # phikit.json reports the eval of the final weights, never an earlier one
        val_loss, val_step = evaluate(), step
        tlog.write(step=step, epoch=round(epoch + micro / max(r.n_micro, 1), 4), eval_loss=round(val_loss, 5))
    return finish(r, val_loss, val_step)


def finish(r: Run, val_loss: float | None, val_step: int | None) -> dict:
    """The summary (phikit.json), the adapter and the last checkpoint of a run whose loop has ended."""
    from ..models.registry import REGISTRY

    cfg, dist, state, step = r.cfg, r.dist, r.state, r.state["step"]
    summary = {
        "base_model": r.spec.name if r.spec.name in REGISTRY else r.spec.source,
        "format": r.m.fmt.name,
        "fixes": r.m.fixes,
        "quant": r.quant,
        "device": r.device,
        "compute": r.compute,
        "processes": dist.world,
        "strategy": cfg.strategy if dist.ddp else None,
        "optimizer": r.opt_note,
        "lora_targets": r.targets,
        "config": cfg.to_dict(),
        "data": {"path": str(r.data_path), "sha256": file_hash(r.data_path), "train_examples": len(r.train_items),
                 "val_examples": len(r.val_items), "truncated": r.enc.truncated, "dropped": r.enc.dropped},
        "steps": step,
        "tokens": state["tokens"],
        "train_s": round(state["train_s"], 1),
        "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
        "final_train_loss": r.tlog.last_loss(),
        "eval_loss": None if val_loss is None else round(val_loss, 5),
        "eval_step": val_step,  # always the final step: the eval_loss is of the weights saved here
    }
    full = dist.trainable_state(r.model, r.optimizer) if dist.fsdp else None  # gathered once, by every rank, for both writes
    if dist.is_main:
        save_adapter(r.model, r.out, summary, full[0] if full else None, tokenizer=r.m.backend.tokenizer, base=peft_base(r.spec))
    _save(dist, r.out, step, r.model, r.optimizer, r.scheduler, state, cfg.keep_last, full)
    r.tlog.write(event="done", **{k: summary[k] for k in ("steps", "train_s", "tokens_per_s", "eval_loss")})
    r.model.eval()
    r.tlog.plot()
    return summary
