"""QLoRA training speed and memory: phikit's step against the stock transformers + peft +
bitsandbytes loop (and the same with Liger kernels), on random weights of a real shape, in one run.

Every side: the same random base weights (saved once, loaded NF4 with double quantisation and
bf16 compute), LoRA r=16 alpha 16 dropout 0.05 on all linear projections, gradient checkpointing,
8-bit AdamW (lr 1e-3, so the loss curve moves enough to compare), bf16 autocast, one fixed batch.
Each side runs in its own process, so its peak memory is its own. phikit's sides are the library's own
path: `SpeedOptions` less the speed-ups a variant turns off (VARIANTS), set up by `prepare_lora`, stepped
by `phikit.train.step.Step`, each loss read one step late by `Readback`, as `phikit train` does.

    python benchmarks/speed/train_speed.py --out results.jsonl                       # Phi-4-mini, seq 2048, micro-batch 2
    python benchmarks/speed/train_speed.py --size phi-4 --micro-batch 1              # phi-4 (14B) shape
    python benchmarks/speed/train_speed.py --impls phikit --seq 131072 --micro-batch 1 --steps 1 --warmup 0   # longest sequence
    python benchmarks/speed/train_speed.py --tiny                                    # CPU, tiny shape: checks the script

One JSON object per side: tokens_per_s (all tokens of the batch over the step time), step_s,
peak_mem_gib (the most allocated on the GPU while training, resident weights included; GiB),
peak_reserved_gib (the most the caching allocator held, free cached blocks included),
losses (per measured step; data and seed are the same on every side, and so are the dropout masks
of the sides that use torch's dropout; phikit's compiled path hashes its own, so compare curves at
--dropout 0), and the shape. RoPE scaling is left out of the random configs: it does not change the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import ROOT, add_out, emit  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "phi-4-mini": dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                       intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True, partial_rotary_factor=0.75),
    "phi-4": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                  intermediate_size=17920, vocab_size=100352, tie_word_embeddings=False),
}
SHAPES["tiny"] = dict(SHAPES["phi-4-mini"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128)
IMPLS = ("phikit", "phikit-fp8", "phikit-per-tensor", "phikit-bnb-nf4", "phikit-unfused", "phikit-eager", "phikit-no-offload", "stock", "stock-liger")
# phikit's sides: the library's default CUDA path (SpeedOptions.for_run) less the speed-ups each one turns off
VARIANTS = {"phikit": {}, "phikit-fp8": {"fp8": True}, "phikit-per-tensor": {"flat_params": False}, "phikit-bnb-nf4": {"compile_nf4": False},
            "phikit-unfused": {"fuse_nf4": False}, "phikit-eager": {"compile": False}, "phikit-no-offload": {"offload": False, "compile": False, "host_embedding": False}}


def build_random(path: str, shape: str, max_pos: int) -> None:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(**SHAPES[shape], max_position_embeddings=max_pos, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    cuda = torch.cuda.is_available() and shape != "tiny"
    with torch.device("cuda" if cuda else "cpu"):
        model = Phi3ForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(path)


def load(path: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from phikit.models.loading import nf4_config

    if device == "cuda":
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(), device_map={"": "cuda"}, dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def batch(args, vocab: int, k: int = 0):
    """Step k's batch: with --data fixed (the speed rows) the same random ids every step; with --data markov
    (loss curves: phikit's sides only) a fresh draw each step from one seeded Markov source over 512 of the
    vocabulary's tokens, 8 successors each, so the loss falls from ln(vocab) towards the source's entropy
    (1.47 nats) instead of to zero on one memorised batch."""
    import torch

    if getattr(args, "data", "fixed") == "markov":
        src = torch.Generator().manual_seed(7)
        states = torch.randperm(vocab - 2, generator=src)[:512] + 2
        nxt = torch.randint(0, 512, (512, 8), generator=src)
        probs = torch.rand(512, 8, generator=src) ** 3
        probs = probs / probs.sum(-1, keepdim=True)
        g = torch.Generator().manual_seed(1000 + k)
        cur = torch.randint(0, 512, (args.micro_batch,), generator=g)
        cols = [cur]
        for _ in range(args.seq - 1):
            cur = nxt[cur, torch.multinomial(probs[cur], 1, generator=g)[:, 0]]
            cols.append(cur)
        ids = states[torch.stack(cols, 1)]
    else:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(2, vocab, (args.micro_batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : int(args.seq * (1 - args.label_frac))] = -100
    return ids, torch.ones_like(ids), labels  # on the host; the stock sides take them to the device once


def optimizer(params, device: str, kind: str = "adamw8bit", phikit: bool = False):
    """The optimizer of a side: phikit's sides take phikit's 8-bit AdamW (bitsandbytes' less its per-tensor
    synchronise), the stock sides bitsandbytes' own."""
    import torch

    if kind == "adamw-fused" and device == "cuda":  # fp32 states, one multi-tensor kernel (the cost of 8-bit, measured)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    if device == "cuda":
        import bitsandbytes as bnb

        from phikit.train.speedups.adamw8bit import adamw8bit

        return (adamw8bit if phikit else bnb.optim.AdamW8bit)(params, lr=1e-3, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def make_phikit(path, args, device):
    """A phikit side, set up as `phikit train` sets up its run, with the speed-ups of VARIANTS[args.impl]:
    (one-step function, the speedups.Speedups made, the optimizer, whether the parameters are flat).
    The step is the library's own (train.step.Step), with no schedule (a constant learning rate)."""
    import dataclasses

    from phikit.models.registry import LLAMA_LORA_TARGETS, PHI_LORA_TARGETS, ModelSpec
    from phikit.train.config import make_config
    from phikit.train.loop import prepare_lora
    from phikit.train.speedups import SpeedOptions, autocast as make_autocast, flat_params
    from phikit.train.step import Step, lm_loss

    cfg = make_config(lora_r=16, lora_alpha=16, lora_dropout=args.dropout, gradient_checkpointing=True, offload_activations=True,
                      compile=True, seed=0)
    speed = dataclasses.replace(SpeedOptions.for_run(cfg, device), **VARIANTS[args.impl])
    base = load(path, device)
    # A checkpoint in the Llama layout (phikit convert --to llama) gets q/k/v and gate/up LoRA of their own.
    targets = LLAMA_LORA_TARGETS if base.config.model_type == "llama" else PHI_LORA_TARGETS
    spec = ModelSpec("random", None, "phi4-mini", lora_targets=targets)
    model, _, made = prepare_lora(base, cfg, spec, "nf4" if device == "cuda" else "none", device, speed)
    autocast = make_autocast(device, speed)  # the loop's: bf16 on CUDA, and on a CPU with bf16 dot products
    params = flat_params([p for p in model.parameters() if p.requires_grad], speed)
    opt = optimizer(params, device, args.optim, phikit=True)

    def fwd(ids, att, lab):  # what Dist().wrap makes in one process: the loop's labels stay on the host
        return lm_loss(model, ids, att, lab, autocast, head_ce=made.head_ce)

    run = Step(fwd, params, opt, None, device=device, max_grad_norm=1.0)
    fixed = batch(args, model.config.vocab_size)

    def one_step(phase, k: int = 0):
        ids, att, lab = fixed if args.data == "fixed" else batch(args, model.config.vocab_size, k)
        return run([(ids, att, lab, True)], int((lab[:, 1:] != -100).sum()), phase)

    return one_step, made, opt, speed.flat_params


def make_stock(path, args, device, liger: bool):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_phi3

        apply_liger_kernel_to_phi3()  # rope, RMSNorm, SwiGLU and fused linear cross-entropy, patched into transformers' Phi3
    model = load(path, device)
    if device == "cuda":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=args.dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, device, args.optim)
    ids, att, lab = (t.to(device) for t in batch(args, model.config.vocab_size))  # on the device once

    def step(phase):
        """The stock transformers + peft step (what a Trainer runs), the reference phikit's is measured against."""
        with phase("phase:forward"):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        with phase("phase:backward"):
            loss.backward()
        with phase("phase:optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def worker(args) -> dict:
    """One side in this process: load, warm up, time `steps` optimizer steps."""
    import torch

    device = "cpu" if args.size == "tiny" else "cuda"
    for kv in args.inductor:
        import torch._inductor.config as ic

        key, value = kv.split("=", 1)
        setattr(ic, key, int(value) if value.isdigit() else value)
    from phikit.train.step import Readback

    t_load = time.perf_counter()
    made, flat = None, False
    if args.impl.startswith("phikit"):
        one_step, made, opt, flat = make_phikit(args.path, args, device)
    else:
        one_step, opt = make_stock(args.path, args, device, liger=args.impl == "stock-liger")
    load_s = time.perf_counter() - t_load
    cuda = device == "cuda"
    if cuda:
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()  # the loader's freed blocks: so the reserved peak is the training's own
        torch.cuda.reset_peak_memory_stats()
    losses, readback = [], Readback()

    def step(k: int, phase=torch.profiler.record_function) -> None:
        """One optimizer step; `phase(name)` wraps each phase (a profiler annotation, or `phases`' timing marks).
        Its loss is read as phikit's loop reads it, one step late, so the host is at most one step ahead of the GPU."""
        torch.manual_seed(100 + k)  # the same dropout masks on every side that uses torch's dropout
        loss = one_step(phase, k) if args.impl.startswith("phikit") else one_step(phase)
        losses.extend(v for v, _ in readback.ready())
        readback.push(loss)

    t_first = time.perf_counter()
    for k in range(args.warmup):
        step(k)
        if k == 0:
            if cuda:
                torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t_first  # compiling, where a side compiles, happens here
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(args.warmup, args.warmup + args.steps):
        step(k)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    losses.extend(v for v, _ in readback.ready())
    row = {"impl": args.impl, "size": args.size, "seq": args.seq, "micro_batch": args.micro_batch, "label_frac": args.label_frac,
           "lora_dropout": args.dropout,
           "tokens_per_s": round(args.micro_batch * args.seq / dt, 1), "step_s": round(dt, 4),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
           # what the caching allocator held at most (allocated + cached free blocks); some tools report this one
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
           "load_peak_gib": round(load_peak / 2**30, 3) if cuda else None, "load_s": round(load_s, 1),
           "steps": args.steps, "warmup": args.warmup, "first_step_s": round(first_step_s, 1) if args.warmup else None, "losses": [round(float(v), 5) for v in losses], "optimizer": type(opt).__name__ + (" (flat)" if flat else ""), **({"inductor": args.inductor} if args.inductor else {}), "quant": "nf4" if cuda else "none"}
    if args.impl == "phikit":
        row["compiled"] = made.compiled_ok
    if cuda:
        row["phases"] = phases(step)
    if args.profile and cuda:
        row["profile"] = profile(step)
    if args.memory and cuda:
        row["memory_at_peak"] = memory_at_peak(step)
    return row


def phases(step) -> dict:
    """One more step without the profiler: per phase, the host's time to queue it and the GPU's time to run it
    (CUDA events). Where the GPU time of a phase is about its host time, the GPU waited for the host there."""
    import torch

    torch.cuda.synchronize()
    marks: list = []

    def mark(name: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((name, time.perf_counter(), ev))

    @contextlib.contextmanager
    def timed(name: str):
        mark(name)
        yield
        mark("end")

    step(10_002, phase=timed)
    torch.cuda.synchronize()
    out = {}
    for (name, t, ev), (_, t2, ev2) in zip(marks[0::2], marks[1::2]):
        out[name.removeprefix("phase:")] = {"host_ms": round((t2 - t) * 1e3, 1), "gpu_ms": round(ev.elapsed_time(ev2), 1)}
    return out


def memory_at_peak(step) -> dict:
    """One more step with the allocator's history on: the bytes live at the step's peak, by where they were
    allocated (the innermost frame in phikit, peft, transformers or bitsandbytes, and the innermost one overall).
    Blocks allocated before the step (weights, LoRA weights and optimizer state, parked inputs) form one row."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step(10_001)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    live_end = {b["address"]: b["size"] for seg in snap["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"}
    # Walk back from the end to find the blocks live before the step, then forward to the peak.
    live = dict(live_end)
    for e in reversed(trace):
        if e["action"] == "alloc":
            live.pop(e["addr"], None)
        elif e["action"] == "free_requested":  # the allocated-bytes counter drops here (a block with pending
            live[e["addr"]] = e["size"]          # stream uses goes back to the cache later: free_completed)
    before = sum(live.values())
    sites = {a: "allocated before the step" for a in live}
    total, peak, peak_i = before, before, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            total += e["size"]
            if total > peak:
                peak, peak_i = total, i
        elif e["action"] == "free_requested":
            total -= e["size"]
    for e in trace[: peak_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            sites[e["addr"]] = _site(e.get("frames") or [])
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    by_site: dict[str, list] = {}
    for a, size in live.items():
        r = by_site.setdefault(sites.get(a, "?"), [0, 0])
        r[0] += size
        r[1] += 1
    top = sorted(by_site.items(), key=lambda kv: -kv[1][0])[:20]
    return {"peak_gib": round(peak / 2**30, 3), "before_step_gib": round(before / 2**30, 3),
            "at_peak": [{"site": k, "mib": round(v[0] / 2**20, 1), "blocks": v[1]} for k, v in top],
            "peak_during": _site(trace[peak_i].get("frames") or []) if peak_i >= 0 else None}


def _site(frames: list) -> str:
    def fmt(f):
        return f"{Path(f['filename']).name}:{f['line']} {f['name']}"

    ours = next((f for f in frames if re.search(r"/(phikit|peft|transformers|bitsandbytes)/", f["filename"])), None)
    inner = frames[0] if frames else None
    if inner is None:
        return "?"
    return fmt(inner) + ("" if ours is None or ours is inner else " <- " + fmt(ours))


def profile(step) -> dict:
    """One more step under the profiler: its wall time, the GPU's busy time (all kernels and copies),
    the 25 CUDA kernels and the 10 CPU-side ops that took the most time."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step(10_000)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ev = p.key_averages()
    # GPU-side events only (kernels, copies, memsets): CPU ops also carry device time, which would count kernels twice
    # GPU-side ranges of host annotations (the phases, "Optimizer.step", compiled-graph calls) are not kernels
    gpu = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e.key)] or list(ev)
    kernels = sorted(gpu, key=lambda e: -e.self_device_time_total)
    cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:10]
    groups: dict[str, float] = {}
    for e in gpu:
        g = kernel_group(e.key)
        groups[g] = groups.get(g, 0.0) + e.self_device_time_total / 1e3
    # The timeline from a second step traced on the GPU side only: the CPU-side tracing above slows the host
    # enough to leave the GPU waiting where it otherwise would not.
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p2:
        step(10_003)
        torch.cuda.synchronize()
    return {"wall_ms": round(wall * 1e3, 1), "gpu_kernel_ms": round(sum(e.self_device_time_total for e in gpu) / 1e3, 1),
            "groups_ms": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "host_phase_ms": host_phases(p.events()),
            "gpu_only_trace": timeline(p2.events()),
            "top_kernels": [{"kernel": e.key[:90], "ms": round(e.self_device_time_total / 1e3, 2), "calls": e.count} for e in kernels[:25]],
            "top_cpu_ops": [{"op": e.key[:60], "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in cpu]}


def timeline(events) -> dict:
    """When the GPU computed and when it waited, in the profiled step: the union of its kernels' intervals
    (the offload copies excluded: they run beside the compute), the idle time inside that span, and the
    longest gaps with the kernels around them."""
    import torch

    kern = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                   and not re.search(r"memcpy (htod|dtoh)", e.name.lower()) and not _annotation(e.name)))
    if not kern:
        return {}
    busy, gaps, end, prev = 0.0, [], kern[0][0], kern[0][2]
    for a, b, name in kern:
        if a > end:
            gaps.append((a - end, prev, name))
        if b > end:
            busy += b - max(a, end)
            end, prev = b, name
    span = end - kern[0][0]
    return {"gpu_span_ms": round(span / 1e3, 1), "gpu_busy_ms": round(busy / 1e3, 1), "gpu_idle_ms": round((span - busy) / 1e3, 1),
            "idle_gaps_over_50us": sum(1 for g in gaps if g[0] > 50), "idle_in_gaps_over_50us_ms": round(sum(g[0] for g in gaps if g[0] > 50) / 1e3, 1),
            "longest_gaps": [{"us": round(g), "after": a[:60], "before": b[:60]} for g, a, b in sorted(gaps, reverse=True)[:8]],
            "gaps_by_neighbours": _gaps_by_neighbours(gaps)}


def host_phases(events) -> dict:
    """Each phase's host time (forward, backward, optimizer), from the step's CPU-side annotations."""
    import torch

    return {e.name[6:]: round((e.time_range.end - e.time_range.start) / 1e3, 1) for e in events if e.name.startswith("phase:")
            and e.device_type == torch.autograd.DeviceType.CPU}


def _gaps_by_neighbours(gaps) -> list:
    """The idle time in gaps over 10 µs, summed by the kernels before and after (first 40 characters of each)."""
    sums: dict[tuple, list] = {}
    for g, a, b in gaps:
        if g > 10:
            r = sums.setdefault((a[:40], b[:40]), [0.0, 0])
            r[0] += g
            r[1] += 1
    return [{"ms": round(t / 1e3, 2), "gaps": n, "after": a, "before": b}
            for (a, b), (t, n) in sorted(sums.items(), key=lambda kv: -kv[1][0])[:10]]


def _annotation(name: str) -> bool:
    return name.startswith(("phase:", "## ", "Optimizer."))


def kernel_group(name: str) -> str:
    """A GPU event's kind, by its kernel name (the offload copies run on a side stream, beside the compute)."""
    n = name.lower()
    for group, pattern in (("offload copies (side stream)", r"memcpy (htod|dtoh)"), ("attention", r"flash|fmha|attention|sdpa"),
                           ("nf4 dequantise", r"dequantize|dequant"), ("optimizer", r"optimizer|adam"),
                           ("matmul fp8", r"f8|fp8|e4m3"), ("matmul", r"nvjet|gemm|cutlass|xmma|sm90_|sm80_|cublas|splitk"), ("compiled (triton)", r"^triton_"),
                           ("eager element-wise", r"elementwise|reduce|vectorized|unrolled|index|cat|copy"),
                           ("memset / device copy", r"memset|memcpy")):
        if re.search(pattern, n):
            return group
    return "other"


def environment() -> dict:
    import torch
    import transformers

    info = {"row": "environment", "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for name in ("peft", "bitsandbytes", "liger_kernel", "triton"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "present")
        except Exception as e:  # not installed: that side is skipped
            info[name] = f"absent ({type(e).__name__})"
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["phi-4-mini", "phi-4", "tiny"], default="phi-4-mini")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (checks the script)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--label-frac", type=float, default=1.0, help="the labelled share of each sequence (its end) [1.0]")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout on every side [0.05]; 0 compares the loss curves "
                    "without the dropout masks, which differ between kernels of different dtypes and are hashed in phikit's compiled path")
    ap.add_argument("--optim", choices=["adamw8bit", "adamw-fused"], default="adamw8bit",
                    help="every side's optimizer: bitsandbytes 8-bit AdamW (the recipe) or torch's fused fp32 AdamW")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (an int/bool/str VALUE) in every side, e.g. cpp_wrapper=1 (repeatable)")
    ap.add_argument("--data", choices=["fixed", "markov"], default="fixed",
                    help="fixed: one random batch every step (speed); markov: a fresh batch a step from a seeded Markov source "
                         "(loss curves, phikit's sides only) [fixed]")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="add the top CUDA kernels of one more step to each row")
    ap.add_argument("--memory", action="store_true", help="add the live GPU memory at one more step's peak, by allocation site")
    add_out(ap)
    ap.add_argument("--impl", help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.size = "tiny"
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 10)
    if args.impl:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return

    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --tiny on the CPU")
    env = emit(environment(), args.out)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        build_random(d, args.size, max(4096, args.seq))
        emit({"row": "built", "size": args.size, "s": round(time.perf_counter() - t0, 1)}, args.out)
        for impl in args.impls.split(","):
            if impl == "stock-liger" and "absent" in str(env["liger_kernel"]) or args.tiny and impl == "stock-liger":
                row = {"impl": impl, "skipped": "liger-kernel not installed" if not args.tiny else "Triton kernels need CUDA"}
            else:
                cmd = [sys.executable, __file__, "--impl", impl, "--path", d, "--size", args.size, "--seq", str(args.seq),
                       "--micro-batch", str(args.micro_batch), "--label-frac", str(args.label_frac), "--dropout", str(args.dropout), "--optim", args.optim, "--data", args.data, "--steps", str(args.steps),
                       "--warmup", str(args.warmup)] + (["--profile"] if args.profile else []) + (["--memory"] if args.memory else []) + (["--tiny"] if args.tiny else []) \
                      + [f"--inductor={kv}" for kv in args.inductor]
                p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                rows = [json.loads(line[4:]) for line in p.stdout.splitlines() if line.startswith("ROW ")]
                err = p.stderr.strip().splitlines()
                row = rows[0] if rows else {"impl": impl, "failed": (err[-1] if err else f"exit {p.returncode}")[:400]}
            row.update(gpu=env.get("gpu"))
            emit(row, args.out)


if __name__ == "__main__":
    main()
