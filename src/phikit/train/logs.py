"""The run's log (`log.jsonl`, one JSON object per step or eval) and its loss curve (`loss.png`).

A run killed while appending leaves a torn last line: reading skips a line that is not a JSON
object, and a resume drops it (with the lines after the checkpoint) in one atomic rewrite."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .checkpoint import write_text_atomic

log = logging.getLogger("phikit")


def _parse(lines: list[str], path: Path) -> list[tuple[str, dict]]:
    """(line, its JSON object) for each line that holds one; any other line (a torn last line) is skipped, with a warning."""
    out = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append((ln, rec))
        else:
            log.warning("%s:%d: not a whole log record (a run killed while writing it?): skipped", path, n)
    return out


class TrainLog:
    """`enabled=False` (ranks other than 0 of a multi-process run) writes nothing and reads back nothing."""

    def __init__(self, out: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = out / "log.jsonl"
        self.png = out / "loss.png"
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Drop what the killed run logged after its last checkpoint (those steps are replayed), and a torn line.
            keep = [ln for ln, r in self._read() if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")

    def _read(self) -> list[tuple[str, dict]]:
        return _parse(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), self.path)

    def write(self, **rec) -> None:
        if not self.enabled:
            return
        rec.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def records(self) -> list[dict]:
        if not self.enabled:
            return []
        return [r for _, r in self._read()]

    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.records() if "loss" in r]
        return losses[-1] if losses else None

    def plot(self) -> None:
        """Training loss per step and eval loss per epoch, as a PNG (matplotlib, headless)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = self.records()
        tr = [(r["step"], r["loss"]) for r in recs if "loss" in r and "step" in r]
        ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r and "step" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss", lw=1)
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (per answer token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.png)
