"""The LoRA / QLoRA training loop: one readable loop (no HF Trainer), in the
spirit of torchtune and nanochat, so every step a user asks about is in view.

    load (phikit) -> LoRA (peft) -> for each optimizer step: accumulate micro-batches,
    clip, step, schedule -> log, checkpoint -> eval loss each epoch -> adapter + phikit.json
"""

from __future__ import annotations

import contextlib
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
from .data import IGNORE, Tokenised, batch_order, collate, file_hash, read_examples, resolve_data_path
from .distributed import Dist, check_strategy, decoder_layers
from .logs import TrainLog

log = logging.getLogger("phikit")


def _pick_quant(cfg: TrainConfig, spec, device: str) -> str:
    if cfg.quant != "auto":
        return cfg.quant
    if cfg.strategy == "fsdp":  # FSDP shards 16-bit weights only (check_strategy)
        return "none"
    return "nf4" if device.startswith("cuda") and not spec.gguf_file else "none"


def _make_optimizer(cfg: TrainConfig, params, device: str):
    """8-bit AdamW (bitsandbytes) on CUDA; torch AdamW elsewhere, since bitsandbytes' 8-bit optimizers need a GPU."""
    import torch

    want = cfg.optimizer
    if want in ("auto", "adamw8bit") and device.startswith("cuda"):
        try:
            from .fast import adamw8bit

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


def prepare_lora(model, cfg: TrainConfig, spec, quant: str, device: str, processes: int = 1):
    """Wrap a loaded model with LoRA as `cfg` says (k-bit preparation for nf4, optional
    gradient checkpointing, its inputs offloaded to CPU memory); returns (peft model in train mode, target module names).

    On CUDA the weights that are not quantised stay bf16. peft's
    prepare_model_for_kbit_training would make them fp32: for Phi-4-mini that is its
    200k x 3072 embedding (1.2 GB more) and an fp32 residual stream (twice the
    activation traffic), while autocast computes the matmuls in bf16 either way.
    Off CUDA there is no autocast, so the fp32 copies are what the layers compute in.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    cuda = device.startswith("cuda")
    gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda
    offload = gc and (cfg.offload_activations if cfg.offload_activations is not None else cuda and processes == 1)
    if offload and processes > 1:
        raise PhikitError("--offload-activations runs in one process only (its recompute happens inside the backward "
                          "call, where DDP/FSDP do not expect gradients); leave it off with --gpus / torchrun")
    layers = decoder_layers(model) if offload else None
    if offload and layers is None:
        log.warning("%s: no decoder layer list found, so activations are checkpointed on the GPU (not offloaded)", type(model).__name__)
        offload = False
    if quant == "nf4" and not cuda:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc and not offload,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc and not offload:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    targets = _lora_targets(model, cfg, spec)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, lcfg)
    if offload:
        from .fast import host_embedding, offload_checkpointing

        offload_checkpointing(layers, compile=cfg.compile if cfg.compile is not None else cuda)
        freed = host_embedding(model)  # an untied frozen input embedding goes to CPU memory with the activations
        if freed:
            log.info("input embedding in pinned CPU memory: %.2f GB of GPU memory freed", freed / 1e9)
    elif cfg.compile:
        log.warning("--compile applies to the offloaded-activation path only (on with checkpointing on CUDA, one process); not compiling")
    model.train()
    return model, targets


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


def _lm_loss(model, ids, att, lab, autocast):
    """Summed cross-entropy over label positions.

    The LM head runs only on the positions that carry a label (the answer
    tokens): with a 49k-200k vocabulary that head is a fifth or more of a small
    model's compute, and the prompt's logits would be thrown away anyway. A
    frozen head (LoRA's case) runs in chunks with its gradient taken on the way
    (fast.linear_cross_entropy), so the logits never exist whole.

    `lab` may stay in CPU memory while the model runs on the GPU (the loop's
    case): the label positions are then found on the host. Found on the GPU, the
    number of positions is a value the host must wait for, which would drain the
    GPU's queue of work in the middle of every step.
    """
    import torch.nn.functional as F
    from torch import nn

    from .fast import linear_cross_entropy

    base = model.get_base_model()
    with autocast():
        hidden = base.base_model(input_ids=ids, attention_mask=att).last_hidden_state
        target = lab[:, 1:]
        keep = target != IGNORE
        if lab.device == hidden.device:
            h, target = hidden[:, :-1][keep], target[keep]
        else:
            b, t = keep.nonzero(as_tuple=True)
            rows, target = _to_device(hidden.device, b * lab.shape[1] + t, target[keep])
            h = hidden.flatten(0, 1).index_select(0, rows)
        head = base.get_output_embeddings()
        if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
            return linear_cross_entropy(h, head.weight, target)
        logits = head(h)
    return F.cross_entropy(logits.float(), target, reduction="sum")


def _to_device(device, *tensors):
    """`tensors` on `device`; to a GPU from pinned memory, so the copies queue behind the GPU's work instead
    of waiting for it (torch's blocking copy synchronises the stream)."""
    import torch

    if torch.device(device).type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


def _on_device(device, ids, att, lab, labels: bool):
    """A batch for the loss: ids and mask on `device`; the labels too where `labels` (the loss runs inside a
    DDP / FSDP wrapper, which takes device tensors), else left on the host, for _lm_loss."""
    ids, att = _to_device(device, ids, att)
    if labels:
        (lab,) = _to_device(device, lab)
    return ids, att, lab


class _Readback:
    """Each step's loss, read on the host one step late.

    float(loss) at the step's end waits for the GPU to finish the step, and the next step then starts
    on an idle GPU whose first layers wait for the host's launches. Here the loss is copied to pinned
    memory behind the step's work, and waited for only once the next step has been queued.
    """

    def __init__(self):
        self.queue: list = []

    def push(self, loss, **fields) -> None:
        import torch

        done = None
        if loss is not None and loss.is_cuda:
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            loss = host
        self.queue.append((loss, done, fields))

    def ready(self):
        """(loss, fields) of each queued step, oldest first (waiting for each)."""
        while self.queue:
            loss, done, fields = self.queue.pop(0)
            if done is not None:
                done.synchronize()
            yield (0.0 if loss is None else float(loss)), fields


def _count_labels(items) -> int:
    return sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in items)


def evaluate_loss(model, items, cfg: TrainConfig, pad_id: int, device: str, autocast, dist: Dist | None = None, fwd=None) -> float | None:
    """Mean per-token loss on the validation items (each process of a multi-process run scores its share).
    Under FSDP the loss runs through the sharded root `fwd`, and every rank as many passes as the others."""
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
            ids, att, lab = _on_device(device, *collate(chunk, pad_id), labels=dist.fsdp)  # FSDP wraps the loss
            loss = fwd(ids, att, lab) if dist.fsdp else _lm_loss(model, ids, att, lab, autocast)
            if real:
                total += float(loss)
                n += _count_labels(chunk)
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


def train(cfg: TrainConfig, stop_after: int | None = None, loaded=None) -> dict:
    """Train a LoRA adapter as `cfg` says; returns a summary (also in DIR/phikit.json).

    `stop_after` ends the run after that many optimizer steps as if killed right
    after a checkpoint (the schedule still spans the whole run): for resume tests.
    `loaded`: a phikit Model already loaded for cfg.model (transformers backend)
    to train in place: LoRA layers are injected into its modules, so afterwards
    it generates with the adapter (the benchmark scores it without reloading).
    Raises DataError on bad data before any training starts.
    """
    import torch

    import phikit

    from ..models.loading import resolve_device
    from ..models.registry import REGISTRY, resolve

    out = Path(cfg.out)
    data_path, train_ex, val_ex, ckpts = check_inputs(cfg)
    spec = resolve(cfg.model)
    # Under torchrun / accelerate launch: join the process group; this rank's GPU is cuda:LOCAL_RANK.
    dist, device = Dist.from_env(resolve_device(cfg.device), cfg.strategy)
    if cfg.strategy == "fsdp" and not dist.ddp:
        log.warning("--strategy fsdp: a single process has nothing to shard; training as one process (use --gpus N or torchrun)")
    quant = _pick_quant(cfg, spec, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    m = loaded or phikit.load(cfg.model, backend="transformers", quant=quant, device=device, format=cfg.format)
    model, tok, fmt = m.backend.model, m.backend.tokenizer, m.fmt
    pad = fmt.pad or tok.pad_token
    pad_id = tok.convert_tokens_to_ids(pad)
    if pad_id is None or pad_id in {tok.convert_tokens_to_ids(s) for s in fmt.stop if s != pad} - {tok.unk_token_id}:
        raise PhikitError(f"{spec.name}: no usable pad token (format {fmt.name} says {pad!r})")

    enc = Tokenised(tok, fmt, cfg.max_seq)
    train_items = [x for x in map(enc.encode, train_ex) if x is not None]
    val_items = [x for x in map(enc.encode, val_ex) if x is not None]
    if not train_items:
        raise DataError(f"{data_path}: no example fits max_seq={cfg.max_seq} even with its context cut; raise --max-seq")
    if not _count_labels(train_items):  # the loss would be 0.0 at every step, and nothing learnt
        raise DataError(_NOTHING_TO_TRAIN.format(path=data_path, why="once tokenised, none has a token to predict"))
    if enc.truncated:
        log.warning("%d example(s) longer than max_seq=%d: context truncated (answers kept); %d dropped", enc.truncated, cfg.max_seq, enc.dropped)

    model, targets = prepare_lora(model, cfg, spec, quant, device, dist.world)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda") else contextlib.nullcontext
    # FSDP replaces the parameters by their shards: shard before the optimizer takes them (DDP wraps after the resume).
    fwd = dist.wrap(model, _lm_loss, autocast) if dist.fsdp else None
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if dist.world == 1:  # DDP and FSDP keep their own gradient buckets and shards
        from .fast import flat_parameters

        params = flat_parameters(params)  # one tensor for the optimizer and clipping, not one per LoRA matrix
    optimizer, opt_note = _make_optimizer(cfg, params, device)

    from transformers import get_cosine_schedule_with_warmup

    lengths = [len(i) for i, _ in train_items]
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
    fwd = fwd or dist.wrap(model, _lm_loss, autocast)  # after the resume: DDP starts from the restored weights
    tlog = TrainLog(out, resume_step=state["step"] if cfg.resume else None, enabled=dist.is_main)
    tlog.write(event="start", total_steps=total, train_examples=len(train_items), val_examples=len(val_items),
               truncated=enc.truncated, dropped=enc.dropped, optimizer=opt_note, quant=quant, device=device,
               trainable_params=n_trainable)

    bar = None
    if cfg.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    step, epoch, micro = state["step"], state["epoch"], state["micro"]
    val_loss, val_step = None, None  # the last eval, and the step it was run at
    readback = _Readback()

    def write_logs() -> None:
        """The log lines of the steps whose loss has not been read yet."""
        for loss_sum, rec in readback.ready():
            (loss_sum,) = dist.all_sum(loss_sum)
            tlog.write(step=rec["step"], epoch=rec["epoch"], loss=round(loss_sum, 5), lr=rec["lr"], tokens_per_s=rec["tokens_per_s"])
            if bar:
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)

    while step < total:
        batches = batch_order(lengths, cfg.micro_batch, cfg.seed, epoch, cfg.group_by_length)
        while micro < len(batches) and step < total:
            t0 = time.perf_counter()
            group = [[train_items[i] for i in b] for b in batches[micro : micro + cfg.grad_accum * dist.world]]
            n_lab = sum(_count_labels(g) for g in group)  # over the global batch: the loss is its per-token mean
            loss_sum, n_tok = None, 0  # the loss stays on the device (see _Readback)
            mine = dist.micro_batches(group)  # this rank's share; passes at weight 0 where it has none (see backward)
            for k, (chunk, real) in enumerate(mine):
                ids, att, lab = collate(chunk, pad_id)
                if real:
                    n_tok += int(att.sum())
                ids, att, lab = _on_device(device, ids, att, lab, labels=dist.ddp)  # DDP / FSDP wrap the loss
                with dist.no_sync(fwd, accumulate=k < len(mine) - 1):
                    loss = fwd(ids, att, lab) / max(n_lab, 1)
                    dist.backward(loss, has_data=real)
                if real:
                    loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            (n_tok,) = dist.all_sum(n_tok)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=False)  # in place: flat_parameters' views must keep their buffer
            micro += len(group)
            step += 1
            lr = scheduler.get_last_lr()[0]
            write_logs()  # the previous step's line: this step is already queued on the GPU behind it
            dt = time.perf_counter() - t0
            readback.push(loss_sum, step=step, epoch=round(epoch + micro / len(batches), 4), lr=lr, tokens_per_s=round(n_tok / dt, 1))
            state.update(step=step, epoch=epoch, micro=micro, tokens=state["tokens"] + n_tok, train_s=state["train_s"] + dt)
            if micro >= len(batches):  # end of epoch: the checkpoint below then starts the next one
                if cfg.eval_every_epoch and val_items:
                    write_logs()  # the step's line before the eval's
                    val_loss, val_step = evaluate_loss(model, val_items, cfg, pad_id, device, autocast, dist, fwd), step
                    tlog.write(step=step, epoch=epoch + 1, eval_loss=round(val_loss, 5))
                epoch, micro = epoch + 1, 0
                state.update(epoch=epoch, micro=micro)
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop_after:
                write_logs()  # the log whole up to the checkpoint, which a resume starts from
                _save(dist, out, step, model, optimizer, scheduler, state, cfg.keep_last)
            if stop_after and step >= stop_after:
                if bar:
                    bar.close()
                tlog.plot()
                return {"stopped_at": step, "out": str(out)}
            if micro == 0:  # an epoch just ended: the outer loop draws the next epoch's order
                break
        if micro >= len(batches):
            epoch, micro = epoch + 1, 0
    write_logs()
    if bar:
        bar.close()
    if val_items and val_step != step:  # phikit.json reports the eval of the final weights, never an earlier one
        val_loss, val_step = evaluate_loss(model, val_items, cfg, pad_id, device, autocast, dist, fwd), step
        tlog.write(step=step, epoch=round(epoch + micro / max(n_micro, 1), 4), eval_loss=round(val_loss, 5))

    base_name = spec.name if spec.name in REGISTRY else spec.source
    summary = {
        "base_model": base_name,
        "format": fmt.name,
        "fixes": m.fixes,
        "quant": quant,
        "device": device,
        "processes": dist.world,
        "strategy": cfg.strategy if dist.ddp else None,
        "optimizer": opt_note,
        "lora_targets": targets,
        "config": cfg.to_dict(),
        "data": {"path": str(data_path), "sha256": file_hash(data_path), "train_examples": len(train_items),
                 "val_examples": len(val_items), "truncated": enc.truncated, "dropped": enc.dropped},
        "steps": step,
        "tokens": state["tokens"],
        "train_s": round(state["train_s"], 1),
        "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
        "final_train_loss": tlog.last_loss(),
        "eval_loss": None if val_loss is None else round(val_loss, 5),
        "eval_step": val_step,  # always the final step: the eval_loss is of the weights saved here
    }
    full = dist.trainable_state(model, optimizer) if dist.fsdp else None  # gathered once, by every rank, for both writes
    if dist.is_main:
        save_adapter(model, out, summary, full[0] if full else None, tokenizer=tok, base=peft_base(spec))
    _save(dist, out, step, model, optimizer, scheduler, state, cfg.keep_last, full)
    tlog.write(event="done", **{k: summary[k] for k in ("steps", "train_s", "tokens_per_s", "eval_loss")})
    model.eval()
    tlog.plot()
    return summary
