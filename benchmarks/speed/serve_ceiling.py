"""What the server itself can stream: `phikit serve --parallel N` over a batch model whose step is a sleep.

The model's step is replaced by `time.sleep(--step-ms)` (which lets go of the interpreter lock, as a GPU step
waited on does) returning one fixed token for every sequence, so everything measured is the server's own
work: the engine thread, handing tokens to the requests' streams, detokenising, stop strings, framing
OpenAI SSE events, uvicorn and the event loop, all under one interpreter lock. Clients are raw-socket
streams in a child process (no SDK parsing, so they cost the machine little). Reported per client count:
SSE events a second against the ideal (clients x 1000 / step-ms: every step streams a token to everyone)
and the server's CPU seconds per event (from its own getrusage). Not a model benchmark: it bounds what any
model can get through this server, and shows what a change to the stream path costs or saves.

The model loaded (default: the embedded GGUF) gives the tokenizer and chat template; it never runs.

    python benchmarks/speed/serve_ceiling.py [--clients 16 64] [--step-ms 10] [--tokens 300] [--loop uvloop|asyncio]
        [--out benchmarks/results/serve_ceiling_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import add_out, emit  # noqa: E402


def serve(argv: list[str], step_s: float, loop: str | None, cpu_file: str, switch_s: float | None = None) -> None:
    """`phikit serve argv` with every backend's batch model replaced by SleepBatch; the CPU it has used is written to
    `cpu_file` every 0.5 s as "time cpu_seconds". `switch_s`: the interpreter's switch interval, if given."""
    if switch_s:
        sys.setswitchinterval(switch_s)
    from phikit.engine.scheduler import BatchModel

    class SleepBatch(BatchModel):
        capacity = 1 << 40

        def __init__(self, be):
            self.token = be.encode(" the")[-1]

        def start(self, seq, reuse):
            seq.sampler = None

        def forward(self, work):
            time.sleep(step_s)
            return {s.id: self.token for s, t in work if s.n_kv + len(t) == len(s.prompt) + len(s.made)}

        def sample(self, seq, out):
            return out

        def finish(self, seq, keep):
            pass

        def cached_tokens(self):
            return 0

        def evict_one(self):
            return False

    from phikit.engine.backends.hf import HFBackend
    from phikit.engine.backends.llamacpp import LlamaCppBackend

    for cls in (HFBackend, LlamaCppBackend):
        cls.batch_model = lambda self, parallel, kv_tokens=None: SleepBatch(self)

    def report():
        with open(cpu_file, "a") as f:
            while True:
                r = resource.getrusage(resource.RUSAGE_SELF)
                f.write(f"{time.time():.3f} {r.ru_utime + r.ru_stime:.4f}\n")
                f.flush()
                time.sleep(0.5)

    threading.Thread(target=report, daemon=True).start()
    if loop:
        import uvicorn

        run = uvicorn.run
        uvicorn.run = lambda *a, **k: run(*a, loop=loop, **k)
    from phikit.cli.main import main

    sys.argv = ["phikit", "serve", *argv]
    sys.exit(main())


async def _client(port: int, name: str, tokens: int, i: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": f"Tell me a story, number {i}."}],
                       "max_tokens": tokens, "temperature": 0.7, "seed": i, "stream": True}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    events, tail = 0, b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        events += data.count(b"data: ")
        tail = (tail + data)[-32:]
        if b"[DONE]" in tail:
            break
    writer.close()
    return events - 2  # the role's first event and [DONE] carry no token


def clients(port: int, name: str, n: int, tokens: int) -> None:
    async def run():
        t0 = time.time()
        events = await asyncio.gather(*[_client(port, name, tokens, i) for i in range(n)])
        return sum(events), t0, time.time()

    events, t0, t1 = asyncio.run(run())
    print(json.dumps({"events": events, "t0": t0, "t1": t1}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--serve-child", "--client-child"):
        if sys.argv[1] == "--serve-child":
            step, loop, cpu_file, switch, *rest = sys.argv[2:]
            serve(rest, float(step), loop or None, cpu_file, float(switch) if switch else None)
        else:
            port, name, n, tokens = sys.argv[2:]
            clients(int(port), name, int(n), int(tokens))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=300, help="tokens each client asks for")
    ap.add_argument("--loop", default=None, help="uvicorn's event loop (default: its own choice: uvloop where installed)")
    ap.add_argument("--model", default=None, help="default: the embedded GGUF")
    ap.add_argument("--switch-ms", type=float, default=None, help="the server's sys.setswitchinterval (default: its own)")
    ap.add_argument("--port", type=int, default=47391)
    add_out(ap)
    args = ap.parse_args()

    import httpx

    cpu_file = f"/tmp/phikit-serve-ceiling-{os.getpid()}.cpu"
    open(cpu_file, "w").close()
    model = ["--model", args.model] if args.model else []
    server = subprocess.Popen([sys.executable, __file__, "--serve-child", str(args.step_ms / 1e3), args.loop or "", cpu_file,
                               str(args.switch_ms / 1e3) if args.switch_ms else "",
                               "--port", str(args.port), *model, "--parallel", str(max(args.clients)),
                               "--log-level", "warning", "--max-tokens-limit", "100000"])
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        import importlib.util

        loop = args.loop or ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")  # what uvicorn picks by default
        for n in args.clients:
            out = subprocess.run([sys.executable, __file__, "--client-child", str(args.port), name, str(n), str(args.tokens)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out)
            time.sleep(0.6)
            samples = [tuple(map(float, line.split())) for line in open(cpu_file) if line.strip()]
            inside = [s for s in samples if r["t0"] <= s[0] <= r["t1"]]
            (ta, ca), (tb, cb) = inside[0], inside[-1]
            rate = r["events"] / (r["t1"] - r["t0"])
            cpu = (cb - ca) / (tb - ta)
            ideal = n * 1e3 / args.step_ms
            emit({"measure": "serve_ceiling", "clients": n, "step_ms": args.step_ms, "tokens_each": args.tokens,
                  "events_per_s": round(rate, 1), "ideal_events_per_s": round(ideal, 1), "of_ideal": round(rate / ideal, 3),
                  "server_cpu_s_per_s": round(cpu, 3), "server_cpu_us_per_event": round(1e6 * cpu / rate, 1),
                  "loop": loop, "switch_ms": args.switch_ms or sys.getswitchinterval() * 1e3, "cpus": os.cpu_count(), "python": platform.python_version()}, args.out)
    finally:
        server.terminate()
        server.wait(30)
        os.unlink(cpu_file)


if __name__ == "__main__":
    main()
