"""Training-step speed: phikit's LoRA/QLoRA step vs the stock transformers + peft +
bitsandbytes loop, on a random Phi-4-mini-sized Phi3ForCausalLM, in the same run.

Both sides: the same base weights (random, saved once, loaded NF4 on CUDA), LoRA r=16
on all linear projections, gradient checkpointing, 8-bit AdamW, bf16 compute,
sequence 2048, micro-batch 2, the last 10% of each sequence as the labelled answer.
They differ only where phikit differs: its loss runs the LM head on the labelled
positions only (the stock loop computes 200k-vocabulary logits for every position).

    python benchmarks/train_speed.py            # CUDA, Phi-4-mini size
    python benchmarks/train_speed.py --tiny     # CPU, tiny size: checks that it runs

One JSON object per row: impl, tokens_per_s, step_s, peak_mem_gib, and the shape.
LongRoPE is left out of the random config (plain RoPE): it does not change the cost.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

PHI4_MINI = dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True, partial_rotary_factor=0.75,
                 max_position_embeddings=4096)
TINY = dict(PHI4_MINI, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def build_random(path: str, arch: dict, dtype) -> None:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(**arch, pad_token_id=199999, eos_token_id=199999, bos_token_id=199999)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Phi3ForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    del model


def load(path: str, quant: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from phikit.models.loading import nf4_config

    if quant == "nf4":
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(), device_map={"": device}, dtype=torch.bfloat16)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def batch(args, device):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 199999, (args.micro_batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : int(args.seq * 0.9)] = -100
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def run_phikit(path, args, device, quant):
    import torch

    from phikit.models.registry import ModelSpec, PHI_LORA_TARGETS
    from phikit.train.config import make_config
    from phikit.train.loop import _lm_loss, _make_optimizer, prepare_lora

    cfg = make_config(lora_r=16, lora_alpha=16, gradient_checkpointing=True, optimizer="auto")
    spec = ModelSpec("random-phi4-mini", None, "phi4-mini", lora_targets=PHI_LORA_TARGETS)
    model, _ = prepare_lora(load(path, quant, device), cfg, spec, quant, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, note = _make_optimizer(cfg, params, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda") else __import__("contextlib").nullcontext
    ids, att, lab = batch(args, device)
    n_lab = int((lab[:, 1:] != -100).sum())

    def step():
        loss = _lm_loss(model, ids, att, lab, autocast) / n_lab
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, note


def run_stock(path, args, device, quant):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load(path, quant, device)
    if quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    if device.startswith("cuda"):
        import bitsandbytes as bnb

        opt, note = bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.01), "adamw8bit"
    else:
        opt, note = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01), "torch AdamW"
    ids, att, lab = batch(args, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, note


def measure(name, make, path, args, device, quant) -> dict:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, note = make(path, args, device, quant)
    for _ in range(args.warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    row = {"impl": name, "tokens_per_s": round(args.micro_batch * args.seq / dt, 1), "step_s": round(dt, 4),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None,
           "seq": args.seq, "micro_batch": args.micro_batch, "quant": quant, "optimizer": note, "device": device,
           "size": "tiny" if args.tiny else "phi-4-mini", "steps": args.steps,
           "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    print(json.dumps(row), flush=True)
    del step
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (a smoke run)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --tiny on CPU")
    args.seq = args.seq or (128 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 10)
    quant = "none" if args.tiny else "nf4"
    with tempfile.TemporaryDirectory() as d:
        build_random(d, TINY if args.tiny else PHI4_MINI, torch.float32 if args.tiny else torch.bfloat16)
        # Alternate order so neither side always runs on a warm allocator.
        for name, make in (("phikit", run_phikit), ("stock-transformers-peft-bnb", run_stock)):
            measure(name, make, d, args, device, quant)


if __name__ == "__main__":
    main()
