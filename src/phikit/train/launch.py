"""`phikit train --gpus N`: the launcher, apart from the process-group code (distributed.py) it starts.

`launch` checks the data once, writes the config to a file and runs torchrun, which starts N
processes of `python -m phikit.cli.train FILE`; each runs `worker`, which joins the process group
(distributed.Dist.from_env) inside `train()`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import PhikitError
from .config import TrainConfig
from .loop import check_inputs, train


def launch(cfg, nproc: int, stop_after: int | None = None) -> int:
    """Run `train(cfg)` in `nproc` processes through torchrun (one per GPU on CUDA, gloo processes on the CPU).

    The config travels as a JSON file; rank 0 writes the results into cfg.out. Returns torchrun's exit status.
    """
    if nproc < 1:
        raise PhikitError("--gpus must be at least 1")
    check_inputs(cfg)  # a bad data line or an existing run fails here, once, not in every process
    if not cfg.device.startswith("cpu"):
        import torch

        if torch.cuda.is_available() and nproc > torch.cuda.device_count():
            raise PhikitError(f"--gpus {nproc}: only {torch.cuda.device_count()} CUDA GPU(s) visible; use --gpus {torch.cuda.device_count()} or fewer")
    with tempfile.TemporaryDirectory(prefix="phikit-launch-") as d:
        spec = Path(d) / "train.json"
        spec.write_text(json.dumps({"config": cfg.to_dict(), "stop_after": stop_after}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "phikit.cli.train", str(spec)]
        env = dict(os.environ)
        # torchrun sets OMP_NUM_THREADS=1 for several processes; on the CPU share the cores among them instead.
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        return subprocess.run(cmd, env=env).returncode


def worker(spec_path: str) -> int:
    """One process started by `launch()` (`python -m phikit.cli.train FILE`): read the launch file and train;
    nothing is printed (the launcher reports from DIR/phikit.json)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"phikit[rank {os.environ.get('RANK', '0')}]: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(spec_path).read_text())
    try:
        train(TrainConfig(**spec["config"]), stop_after=spec["stop_after"])
    except PhikitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

