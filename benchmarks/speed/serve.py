"""The server's cost and throughput on the embedded default model (llama.cpp, CPU).

1. Overhead: time to first token and decode tokens/s of the same greedy chat
   generation in-process (`Model.stream`) and through HTTP (streaming
   /v1/chat/completions from a `phikit serve` subprocess, parsed as SSE by
   httpx here), interleaved so load on the machine hits both alike (and only one
   generates at a time); medians over --reps. The server is its own process, as
   in real use, so the client's parsing does not share its interpreter lock.
2. Concurrency: aggregate output tokens/s with 1, 4 and 16 streaming clients
   at once (one generation slot: they queue), plus the median and worst time to
   first token a client sees (queueing included).

One JSON row per measurement on stdout (and appended to --out as JSON lines).

    python benchmarks/speed/serve.py [--reps 3] [--max-tokens 48] [--clients 1 4 16] [--client-tokens 24] [--out benchmarks/results/serve.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import add_out, emit  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def in_process(model, n: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    for c in model.stream(MESSAGES, max_tokens=n, temperature=0):
        if c.text:
            last = time.perf_counter()
            first = first or last
        if c.stats:
            tokens = c.stats.completion_tokens
    return _row(t0, first, last, tokens)


def over_http(url: str, name: str, n: int, messages=MESSAGES, seed: int | None = None) -> dict:
    import httpx

    body = {"model": name, "messages": messages, "max_tokens": n, "temperature": 0 if seed is None else 0.7, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return _row(t0, first, last, tokens)


def _row(t0, first, last, tokens) -> dict:
    now = time.perf_counter()
    first, last = first or now, last or now
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"ttft_s": first - t0, "tokens_per_s": rate, "tokens": tokens, "total_s": now - t0}


def median(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 4)


def concurrent(url: str, name: str, clients: int, n: int) -> dict:
    rows: list[dict] = [None] * clients  # type: ignore[list-item]

    def one(i: int) -> None:
        # distinct prompts and seeds so no two clients could share an answer
        msgs = [{"role": "user", "content": f"Story {i}: {MESSAGES[0]['content']}"}]
        rows[i] = over_http(url, name, n, msgs, seed=i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in rows)
    ttfts = sorted(r["ttft_s"] for r in rows)
    return {"clients": clients, "output_tokens": total, "wall_s": round(wall, 3),
            "aggregate_tokens_per_s": round(total / wall, 2),
            "ttft_median_s": round(statistics.median(ttfts), 3), "ttft_max_s": round(ttfts[-1], 3)}


SERVER: list[subprocess.Popen] = []


def start_server(port: int) -> str:
    """`phikit serve` on the embedded model in a subprocess; returns its URL once /health answers."""
    import httpx

    SERVER.append(subprocess.Popen([sys.executable, "-m", "phikit.cli.main", "serve", "--port", str(port), "--n-ctx", "2048",
                                    "--log-level", "warning"]))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url
        except httpx.ConnectError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--client-tokens", type=int, default=24)
    add_out(ap)
    args = ap.parse_args()

    import phikit
    from phikit.serve.thread import free_port

    model = phikit.load(n_ctx=2048)
    env = {"model": model.name, "backend": model.backend.name, "cpus": os.cpu_count(), "python": platform.python_version(),
           "load_avg_at_start": os.getloadavg()[0]}
    url = start_server(free_port())
    try:
        over_http(url, model.name, 4)  # warm both paths once
        in_process(model, 4)
        local, http = [], []
        for _ in range(args.reps):  # interleaved: the server is idle while the in-process run goes
            local.append(in_process(model, args.max_tokens))
            http.append(over_http(url, model.name, args.max_tokens))
        for path, rows in (("in-process", local), ("http", http)):
            emit({"measure": "overhead", "path": path, "max_tokens": args.max_tokens, "reps": args.reps,
                  "ttft_s": median(rows, "ttft_s"), "tokens_per_s": round(median(rows, "tokens_per_s"), 2),
                  "tokens": median(rows, "tokens"), **env}, args.out)
        for k in args.clients:
            emit({"measure": "concurrency", "max_tokens": args.client_tokens, **concurrent(url, model.name, k, args.client_tokens), **env}, args.out)
    finally:
        SERVER[0].terminate()
        SERVER[0].wait(timeout=30)


if __name__ == "__main__":
    main()
