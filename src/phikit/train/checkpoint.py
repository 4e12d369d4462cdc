"""Checkpoints that survive a kill or a full disk: each is written into a
`.tmp` folder beside the others and renamed into place only when complete, so
the previous one is never touched; the oldest are pruned after the rename.

`trainer.pt` holds tensors and plain Python values only (numbers, strings, lists,
tuples, dicts), and is read back with `torch.load(weights_only=True)`: a crafted
file in an output folder cannot run code on `--resume`."""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path

from ..errors import PhikitError

CKPT_DIR = "checkpoints"


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:  # fsync through a read-only descriptor works on Linux and macOS
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """`text` in `path`, or `path` as it was: written beside it, fsynced, renamed over it (then its folder fsynced)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (what `torch.load(weights_only=True)` reads)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st = {"python": [version, list(internal), gauss_next],
          "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss_next = st["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = st["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # a checkpoint of an earlier phikit: numpy's own tuple (read through _legacy_numpy)
        np.random.set_state(n)
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
    fsync_dir(tmp)
    old = root / f".step-{step:07d}.old"
    if final.exists():  # same step saved again (resumed run): moved aside, deleted only once the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # a kill from here to the next rename leaves it as .old, which list_checkpoints still finds
    os.replace(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(".step-*.old"):  # left by a kill after its replacement was in place
        if (root / aside.name[1:-4] / "trainer.pt").is_file():
            shutil.rmtree(aside, ignore_errors=True)
    return final


_STEP = re.compile(r"step-(\d+)|\.step-(\d+)\.old")


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` folders are ignored). A `.step-N.old` folder (the
    previous save of step N, moved aside by a run killed while re-saving that step) stands in for a missing `step-N`."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = _STEP.fullmatch(p.name)
        if not m or not (p / "trainer.pt").is_file():
            continue
        step = int(m[1] or m[2])
        if m[1] or step not in found:
            found[step] = p
    return [found[s] for s in sorted(found)]


def _legacy_numpy():
    """The numpy globals of a numpy RNG state saved as numpy's own tuple (phikit before weights_only loading):
    an array and its dtype, which build data only."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]  # numpy 2's dtype classes (numpy.dtypes.UInt32DType) are pickled by name


def read_trainer_file(path: Path) -> dict:
    """`path`/trainer.pt read as tensors and plain values only (`weights_only=True`); PhikitError otherwise."""
    import torch

    f = path / "trainer.pt"
    try:
        with torch.serialization.safe_globals(_legacy_numpy()):
            blob = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)  # torch words it in two ways
        raise PhikitError(
            f"{f} holds more than tensors and plain values ({'it refers to ' + what[1] if what else 'an object phikit does not load'}), "
            "so it was not loaded: phikit never writes such a file, so it was made or changed by something else. "
            f"Delete {path} (or train into another --out) and rerun"
        ) from None
    except (EOFError, RuntimeError, OSError) as e:
        raise PhikitError(f"{f} cannot be read ({type(e).__name__}: {str(e)[:200]}): delete {path} and rerun with --resume "
                          "(the previous checkpoint, if any, is used)") from None
    if not isinstance(blob, dict) or not {"optimizer", "scheduler", "state", "rng"} <= set(blob):
        raise PhikitError(f"{f} is not a phikit checkpoint: delete {path} (or train into another --out) and rerun")
    return blob


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, dist=None) -> dict:
    """Restore everything saved by `save_checkpoint` (the RNG state of process `rank`); returns the loop state.
    `dist`: the run's `Dist`; an FSDP run's checkpoint holds full state dicts that only an FSDP run reloads."""
    from peft import set_peft_model_state_dict

    blob = read_trainer_file(path)
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
        except ValueError as e:  # e.g. per-tensor state from before the flat LoRA buffer (train/speedups/flat_params.py)
            raise PhikitError(f"{path}: its optimizer state does not fit this run's optimizer ({e}); it was written by "
                              "another phikit version or setup: start a new run (another --out)") from None
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng_ranks"][rank] if "rng_ranks" in blob else blob["rng"])
    return blob["state"]
