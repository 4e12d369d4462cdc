"""Running a model over evaluation items: progress, timings, metadata, results files.

Every results file has the same three parts: `meta` (what was run, on what,
with which prompt, so two files are comparable or visibly not), `metrics`
and `records` (one per item). Generation goes through `Model.stream` one item
at a time, or `Model.generate_batch` where the backend batches (transformers;
a remote server through concurrent requests).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import PhikitError

PACKAGES = ("phikit", "llama_cpp_python", "transformers", "torch", "peft", "numpy", "matplotlib")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def meta(task: str, model, data_path: str | Path, limit: int | None, params, prompt: dict, **extra) -> dict:
    """The record of what a run was: model, adapter, data hash, limit, seed, prompt, versions, date."""
    info = model.info() if model is not None else {}
    return {
        "task": task,
        "model": info.get("model"),
        "model_source": info.get("source"),
        "backend": info.get("backend"),
        "quant": info.get("quant"),
        "adapter": getattr(model, "adapter", None),
        "data": str(data_path),
        "data_sha256": sha256(data_path),
        "limit": limit,
        "seed": getattr(params, "seed", None),
        "sampling": {k: getattr(params, k) for k in ("temperature", "top_p", "top_k", "max_tokens")} if params else None,
        "prompt": prompt,
        "packages": package_versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "threads": info.get("threads"), "machine": platform.machine()},
        **extra,
    }


def generate_all(model, message_lists: Iterable[list[dict]], params, total: int, label: str, progress: bool = True,
                 batch_size: int | None = None) -> Iterator[dict]:
    """Yield, per prompt and in order, the reply text and its timings; a progress bar on stderr.

    Prompts run `batch_size` at a time where the backend batches (default: the
    backend's `max_batch`; 1 = one by one through `Model.stream`). Batches are
    formed from prompts of similar length (less padding); in a batch every item's
    latency runs from the batch's start to its own last token.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..engine.types import join

    size = batch_size_for(model, batch_size)
    if size < 1:
        raise PhikitError(f"--batch-size must be at least 1, got {size}")
    cols = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    # A live bar draws nothing into a log file (nohup, CI): there, print a line every 5% instead.
    every = max(1, total // 20) if progress and not console.is_terminal else 0
    t_start = time.perf_counter()
    done = 0

    def advance(bar, task, n: int) -> None:
        nonlocal done
        bar.advance(task, n)
        if every and (done // every != (done + n) // every or done + n == total):
            print(f"{label}: {done + n}/{total} in {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
        done += n

    def record(r, latency_s: float) -> dict:
        return {"reply": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "ttft_s": r.ttft_s, "latency_s": round(latency_s, 4)}

    with Progress(*cols, console=console, disable=not progress or bool(every)) as bar:
        task = bar.add_task(label, total=total)
        if size == 1:
            for messages in message_lists:
                t0 = time.perf_counter()
                out = record(join(model.stream(messages, params), model.name), time.perf_counter() - t0)
                advance(bar, task, 1)  # before the yield: a consumer that zips may never resume us after the last item
                yield out
            return
        chats = list(message_lists)
        order = sorted(range(len(chats)), key=lambda i: -sum(len(m.get("content") or "") for m in chats[i]))
        outs: dict[int, dict] = {}
        for b in range(0, len(order), size):
            idx = order[b : b + size]
            for i, r in zip(idx, model.generate_batch([chats[i] for i in idx], params)):
                outs[i] = record(r, r.total_s)
            advance(bar, task, len(idx))
    for i in range(len(outs)):
        yield outs[i]


def batch_size_for(model, batch_size: int | None) -> int:
    """The batch size a run uses: the one asked for, else the backend's default (1: no batching)."""
    return batch_size or getattr(model.backend, "max_batch", 1)


def speed_metrics(records: list[dict], wall_s: float | None = None) -> dict:
    """Latency p50/p95, mean reply length in tokens, and tokens/s over the whole run.

    wall_s: the run's wall time, when items overlapped (batches, parallel shards): the
    throughput is then tokens over that time rather than over the sum of latencies."""
    lat = [r["latency_s"] for r in records]
    toks = sum(r["completion_tokens"] for r in records)
    decode_toks = sum(max(r["completion_tokens"] - 1, 0) for r in records)
    decode_s = sum(max(r["latency_s"] - r["ttft_s"], 0.0) for r in records)
    return {
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "mean_reply_tokens": toks / len(records) if records else None,
        # Decode rate (tokens after the first over their time), as engine.Stats reports it, pooled over items.
        "tokens_per_s": decode_toks / decode_s if decode_s > 0 else None,
        # End-to-end throughput: every generated token over all the time spent, prompt processing included.
        "throughput_tokens_per_s": toks / wall_s if wall_s else toks / sum(lat) if lat and sum(lat) > 0 else None,
    }


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if 0 < q < 100 else (min(xs) if q <= 0 else max(xs))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write atomically (beside, then rename), so a crash never leaves half a file or loses the old one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


def read_results(path: str | Path) -> dict:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        d["meta"]["task"], d["metrics"], d["records"]  # noqa: B018
    except FileNotFoundError:
        raise PhikitError(f"{p}: no such results file") from None
    except (ValueError, KeyError, TypeError):
        raise PhikitError(f"{p} is not a phikit eval results file (written by `phikit eval squad2|gsm8k --out`)") from None
    return d
