"""What a recompute needs to replay a forward exactly: the RNG states (so dropout draws the same masks) and
the autocast state, captured at the forward and restored around the recompute (offload.py, tiled_mlp.py)."""

from __future__ import annotations

import contextlib

import torch


def capture(x: torch.Tensor) -> tuple:
    """What a recompute needs to replay a forward exactly: the RNG states (dropout masks) and autocast."""
    dev = x.device
    return (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if x.is_cuda else None,
            torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))


@contextlib.contextmanager
def replay(state: tuple, x: torch.Tensor):
    """Within: the captured RNG states and autocast, with grad on; the caller's RNG is restored after."""
    rng_cpu, rng_dev, enabled, dtype = state
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.set_rng_state(rng_cpu)
        if rng_dev is not None:
            torch.cuda.set_rng_state(rng_dev, x.device)
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            yield
