"""The data-parallel path (torchrun + torch DDP) against a plain one-process run with the same global batch.

On one GPU: `--nproc 1` launches one torchrun process, so the run goes through the nccl process
group, DDP's forward and gradient all-reduce, no_sync, the RNG gather and the rank-0 writes, all
with a world of 1. On the CPU: `--nproc 2` runs 2 gloo processes (what the tests do).

    python benchmarks/quality/train_ddp_check.py                      # CUDA: nproc 1, 16-bit and NF4
    python benchmarks/quality/train_ddp_check.py --device cpu --nproc 2
    python benchmarks/quality/train_ddp_check.py --strategy fsdp        # FSDP2 (16-bit), world of 1 on CUDA

A tiny random Phi-3 model (tests/tiny.py), examples/zorblax_facts.jsonl, LoRA dropout 0 (so both
runs draw no random masks). The one-process reference runs twice, to show the run-to-run noise
of the device (CUDA bf16 kernels need not be bit-reproducible). One JSON row per quantisation on
stdout (and appended to --out as JSON lines, e.g. benchmarks/results/train_ddp_check_h100.jsonl):
per-step losses of both, the largest loss and adapter-weight differences, wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import ROOT, add_out, emit  # noqa: E402


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--quant", nargs="*", help="none and/or nf4 [both on CUDA, none on the CPU]")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="fsdp: 16-bit only (QLoRA + FSDP is refused)")
    add_out(ap)
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_model_dir

    from phikit.train import make_config, train
    from phikit.train.launch import launch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    quants = args.quant or (["none", "nf4"] if device == "cuda" and args.strategy == "ddp" else ["none"])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = build_model_dir("phi3", tmp / "model", layers=4, hidden=256)
        for quant in quants:
            common = dict(data=str(ROOT / "examples" / "zorblax_facts.jsonl"), model=str(model), device=device, quant=quant,
                          max_seq=256, micro_batch=2, lr=1e-3, max_steps=args.steps, save_every=args.steps // 2,
                          val_split=0.1, lora_dropout=0.0, progress=False)
            row: dict = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                         "quant": quant, "strategy": args.strategy, "nproc": args.nproc, "global_batch": 2 * 2 * args.nproc, "steps": args.steps}
            try:
                t = time.perf_counter()
                train(make_config(**common, out=str(tmp / f"ref-{quant}"), grad_accum=2 * args.nproc))
                row["ref_s"] = round(time.perf_counter() - t, 1)
                train(make_config(**common, out=str(tmp / f"ref2-{quant}"), grad_accum=2 * args.nproc))
                t = time.perf_counter()
                rc = launch(make_config(**common, out=str(tmp / f"ddp-{quant}"), grad_accum=2, strategy=args.strategy), args.nproc)
                row["ddp_s_with_start"] = round(time.perf_counter() - t, 1)
                if rc != 0:
                    raise RuntimeError(f"torchrun exit status {rc}")
                ref, ref2, ddp = (tmp / f"{n}-{quant}" for n in ("ref", "ref2", "ddp"))
                la, lb = _losses(ref), _losses(ddp)
                meta = json.loads((ddp / "phikit.json").read_text())
                row.update(ref_losses=la, ddp_losses=lb, ddp_processes=meta["processes"],
                           max_loss_diff=max(abs(a - b) for a, b in zip(la, lb)),
                           max_adapter_diff=_max_diff(ref, ddp), ref_vs_ref_adapter_diff=_max_diff(ref, ref2))
            except Exception as e:  # one quantisation failing (e.g. no bitsandbytes) still reports the others
                row["error"] = f"{type(e).__name__}: {e}"
            emit(row, args.out)


if __name__ == "__main__":
    main()
