"""Checkpoints that survive a kill or a full disk: each is written into a
`.tmp` folder beside the others and renamed into place only when complete, so
the previous one is never touched; the oldest are pruned after the rename."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from ..errors import PhikitError

CKPT_DIR = "checkpoints"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, state: dict, keep_last: int, rng_ranks: list | None = None,
                    fsdp_state: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoint `step` (adapter weights, optimizer, scheduler, loop position, RNG) atomically.

    `rng_ranks`: every rank's RNG state in a multi-process run (rank 0 writes them all).
    `fsdp_state`: (trainable weights, optimizer state) gathered in full from an FSDP-sharded model, keyed by
    parameter name (`Dist.trainable_state`); saved instead of the model's and optimizer's own (shards)."""
    import torch
    from peft import get_peft_model_state_dict

    root = out / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    blob = {
        **({"fsdp_weights": fsdp_state[0]} if fsdp_state else {"adapter": get_peft_model_state_dict(model)}),
        "optimizer": fsdp_state[1] if fsdp_state else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "rng": rng_state(),
    }
    if rng_ranks is not None:
        blob["rng_ranks"] = rng_ranks
    try:
        with open(tmp / "trainer.pt", "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O error: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        prev = list_checkpoints(out)
        raise PhikitError(
            f"could not write checkpoint {final.name} ({e}); "
            + (f"the previous one, {prev[-1]}, is intact: free space and rerun with --resume" if prev else "free space and rerun")
        ) from None
    if final.exists():  # same step saved again (resumed run): replace it only now that the new one is whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` folders are ignored)."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "trainer.pt").is_file())


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, dist=None) -> dict:
    """Restore everything saved by `save_checkpoint` (the RNG state of process `rank`); returns the loop state.
    `dist`: the run's `Dist`; an FSDP run's checkpoint holds full state dicts that only an FSDP run reloads."""
    import torch
    from peft import set_peft_model_state_dict

    blob = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    fsdp = dist is not None and dist.fsdp
    if ("fsdp_weights" in blob) != fsdp:
        was, now = ("fsdp", "ddp (or one process)") if "fsdp_weights" in blob else ("ddp (or one process)", "fsdp")
        raise PhikitError(f"{path} was written by a --strategy {was} run, this one is {now}: resume it with the strategy it had")
    world = dist.world if dist is not None else 1
    if blob["state"].get("world_size", 1) != world:  # the global batch, the schedule and the optimizer's layout depend on it
        raise PhikitError(f"{path} was written by a run on {blob['state'].get('world_size', 1)} process(es): resume it with as many (--gpus)")
    if fsdp:
        dist.load_trainable_state(model, optimizer, blob["fsdp_weights"], blob["optimizer"])
    else:
        set_peft_model_state_dict(model, blob["adapter"])
        try:
            optimizer.load_state_dict(blob["optimizer"])
        except ValueError as e:  # e.g. per-tensor state from before the flat LoRA buffer (train/fast.flat_parameters)
            raise PhikitError(f"{path}: its optimizer state does not fit this run's optimizer ({e}); it was written by "
                              "another phikit version or setup: start a new run (another --out)") from None
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng_ranks"][rank] if "rng_ranks" in blob else blob["rng"])
    return blob["state"]
