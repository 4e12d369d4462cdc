"""The server's cost and throughput: one model, many clients, with and without continuous batching.

1. Overhead: time to first token and decode tokens/s of the same greedy chat
   generation in-process (`Model.stream`) and through HTTP (streaming
   /v1/chat/completions from a `phikit serve` subprocess, parsed as SSE by
   httpx here), interleaved so load on the machine hits both alike (and only one
   generates at a time); medians over --reps. The server is its own process, as
   in real use, so the client's parsing does not share its interpreter lock.
2. Concurrency (issue 19's measure): N clients of the `openai` SDK (AsyncOpenAI, streaming) at once, each
   with its own ~--prompt-tokens prompt and --client-tokens new tokens, against each --side: a `phikit serve`
   started with that side's flags (`p1`: --parallel 1 --no-prompt-cache, one request at a time as before
   batching; `pN`: --parallel N). Aggregate output tokens/s, p50/p95 time to first token and inter-token
   latency. The clients run in processes of --clients-per-process each (a team's apps are processes of their
   own), released together once all are ready: one Python process parsing every stream's events with the SDK
   (~150-300 us of CPU an event) was itself the cap at 64 clients.
3. A 10-turn chat through /v1/chat/completions, each turn's prompt the whole history: time to first
   token per turn with the prompt cache (the pN side) and without it (p1). `--chat-in-process WORDS`: the
   same chat through the model's scheduler in this process (less noise), with what each turn read.
4. Agreement (`--agreement`, in-process): greedy replies of --agree-prompts prompts run alone on the
   backend's own loop, then all at once through the scheduler, then again (prompt-cache hits): how many
   replies are identical, and the tokens before the first divergence where not.

One JSON row per measurement on stdout (and appended to --out as JSON lines).

    python benchmarks/speed/serve.py [--sides p1 p4] [--clients 1 4] [--prompt-tokens 128] [--client-tokens 256]
        [--chat-turns 10] [--chat-in-process WORDS] [--agreement] [--model M --backend B --device D --quant Q] [--out benchmarks/results/serve.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import ROOT, add_out, emit  # noqa: E402

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


WORDS = ("the lighthouse keeper found a bottle on the rocks and read the message inside it twice before "
         "deciding what to do next while the storm kept rising over the dark water").split()


def prompt_of(i: int, words: int) -> str:
    """A distinct user prompt of `words` words."""
    body = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
    return f"Client {i}. Continue this story: {body}"


def words_for(url: str, name: str, tokens: int) -> int:
    """How many words make a chat prompt of about `tokens` tokens for this server's model (read from usage)."""
    import httpx

    def count(words: int) -> int:
        r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": name, "messages": [{"role": "user", "content": prompt_of(0, words)}], "max_tokens": 1})
        r.raise_for_status()
        return r.json()["usage"]["prompt_tokens"]

    base, per = count(0), (count(100) - count(0)) / 100
    return max(1, round((tokens - base) / per))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def _sdk_stream(client, name: str, messages: list[dict], n: int, seed: int | None, fixed: bool = False) -> dict:
    """One streaming chat request; `fixed`: exactly n tokens (ignore_eos, as vLLM's serving benchmark sends), greedy (a
    random-weight model's sampled tokens would mostly be ids its small tokenizer cannot write)."""
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.chat.completions.create(model=name, messages=messages, max_tokens=n, stream=True,
                                                  temperature=0 if seed is None or fixed else 0.8, seed=seed,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True} if fixed else None)
    text = ""
    async for ev in stream:
        if ev.usage:
            tokens = ev.usage.completion_tokens
        if ev.choices and ev.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text += ev.choices[0].delta.content
    return {"t0": t0, "stamps": stamps, "tokens": tokens, "text": text}


CLIENTS_PER_PROCESS = 8


def _client_group(url: str, name: str, ids: list[int], n: int, words: int, ready, go, results) -> None:
    """A client process: the streams of clients `ids` (prompts `ids`), started when `go` is set; puts its rows (times
    on the system's monotonic clock, which perf_counter reads on Linux, so comparable across processes) in `results`."""
    import asyncio

    import openai

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600) as client:
            await client.models.list()  # the client's cold start (lazy imports, connection pool) before the clock
            client.chat.completions  # noqa: B018 (imports the chat resources)
            ready.put(os.getpid())
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            return await asyncio.gather(*(_sdk_stream(client, name, [{"role": "user", "content": prompt_of(i, words)}], n, i, True)
                                          for i in ids))

    try:
        rows = asyncio.run(run())
        for r in rows:
            r["t_end"] = time.perf_counter()
        results.put(rows)
    except BaseException as e:  # the parent reports it
        ready.put(os.getpid())  # in case it failed before it was ready
        results.put(f"{type(e).__name__}: {e}")


def concurrent(url: str, name: str, clients: int, n: int, words: int, first: int = 0,
               per_process: int = CLIENTS_PER_PROCESS) -> dict:
    """`clients` openai-SDK streams at once, n tokens each, prompts `first`, `first` + 1, ... (a run's prompts are its
    own: no prompt cache hit from an earlier run), in processes of `per_process` clients released together;
    aggregate tokens/s (all tokens over the time from the release to the last stream's end), p50/p95 TTFT and
    inter-token latency."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # not fork: this process may hold CUDA or threads
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    ids = list(range(first, first + clients))
    groups = [ids[i : i + per_process] for i in range(0, clients, per_process)]
    procs = [ctx.Process(target=_client_group, args=(url, name, g, n, words, ready, go, results), daemon=True) for g in groups]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    t0 = time.perf_counter()
    go.set()
    rows = []
    for _ in procs:
        got = results.get(timeout=3600)
        if isinstance(got, str):
            raise RuntimeError(f"a client process failed: {got}")
        rows += got
    for p in procs:
        p.join()
    wall = max(r["t_end"] for r in rows) - t0
    total = sum(r["tokens"] for r in rows)
    ttft = [r["stamps"][0] - r["t0"] for r in rows if r["stamps"]]
    itl = [b - a for r in rows for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"clients": clients, "client_processes": len(groups), "output_tokens": total, "wall_s": round(wall, 3),
            "aggregate_tokens_per_s": round(total / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p95_s": round(percentile(ttft, 0.95), 4),
            "itl_p50_s": round(percentile(itl, 0.5), 4), "itl_p95_s": round(percentile(itl, 0.95), 4)}


CHAT_SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers in detail."}


def chat_turn(t: int, words: int) -> dict:
    """The user's message of the chat's turn t (from 0), of about `words` words."""
    return {"role": "user", "content": f"Question {t + 1}: {prompt_of(t, words)} What happens next?"}


def chat_turns(url: str, name: str, turns: int, n: int, words: int) -> list[float]:
    """Time to first token of each turn of one chat whose history grows (greedy, n tokens a reply)."""
    import asyncio

    import openai

    async def run():
        history, out = [CHAT_SYSTEM], []
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
            for t in range(turns):
                history.append(chat_turn(t, words))
                r = await _sdk_stream(client, name, history, n, None)
                out.append(r["stamps"][0] - r["t0"] if r["stamps"] else float("nan"))
                history.append({"role": "assistant", "content": r["text"]})
        return out

    return asyncio.run(run())


def chat_turns_local(model, turns: int, n: int, words: int, parallel: int = 4) -> dict:
    """The chat of `chat_turns` in this process, through the model's own scheduler (`enable_batching(parallel)`,
    prompt cache on): no HTTP and no client processes, so this machine's noise weighs less. Also what each turn
    read: its prompt's tokens and how many came from the cache."""
    be = model.backend
    be.enable_batching(parallel, prompt_cache=True)
    sch, ttft, read = be.scheduler, [], []
    try:
        history = [CHAT_SYSTEM]
        for t in range(turns):
            history.append(chat_turn(t, words))
            p0, h0, text, first = sch.prompt_tokens, sch.cache_hit_tokens, "", None
            t0 = time.perf_counter()
            for c in model.stream(history, max_tokens=n, temperature=0):
                first = first or time.perf_counter() - t0
                text += c.text
            ttft.append(first)
            read.append([sch.prompt_tokens - p0, sch.cache_hit_tokens - h0])
            history.append({"role": "assistant", "content": text})
    finally:
        be.close()
    return {"ttft_s": [round(x, 4) for x in ttft], "prompt_and_hit_tokens": read}


SIDES = {"p1": ["--parallel", "1", "--no-prompt-cache"]}  # pN: --parallel N (prompt cache on)


def side_flags(side: str) -> list[str]:
    if side in SIDES:
        return SIDES[side]
    if side.startswith("p") and side[1:].isdigit():
        return ["--parallel", side[1:]]
    raise SystemExit(f"unknown side {side!r}: p1 (one at a time) or pN (--parallel N)")


SERVER: list[subprocess.Popen] = []


def start_server(port: int, flags: list[str], model_args: list[str]) -> str:
    """`phikit serve` in a subprocess with `flags`; returns its URL once /health answers."""
    import httpx

    SERVER.append(subprocess.Popen([sys.executable, "-m", "phikit.cli.main", "serve", "--port", str(port), *model_args,
                                    "--log-level", "warning", "--max-tokens-limit", "8192", *flags]))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if SERVER[-1].poll() is not None:
            raise SystemExit("the server exited")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url
        except httpx.ConnectError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def stop_server() -> None:
    p = SERVER.pop()
    p.terminate()
    p.wait(timeout=60)


def agreement(model, prompts: list[str], n: int) -> list[dict]:
    """Greedy replies alone (the backend's own loop), then all together through the scheduler, then again
    (prompt-cache hits): identical replies, and the common prefix in tokens where they differ."""
    from phikit.engine.types import SamplingParams

    be = model.backend
    params = SamplingParams(max_tokens=n, temperature=0)

    def ids(reply_text: str) -> list[int]:
        return be.encode(reply_text) if reply_text else []

    alone = [model.generate(p, params).text for p in prompts]
    be.enable_batching(max(2, len(prompts)), prompt_cache=True)
    try:
        together = [r.text for r in model.generate_batch(prompts, params)]
        cached = [r.text for r in model.generate_batch(prompts, params)]
        hits = be.scheduler.stats()["cache_hit_tokens"]
    finally:
        be.close()
    rows = []
    for what, texts in (("batched_vs_alone", together), ("cached_vs_alone", cached), ("cached_vs_batched", None)):
        a, b = (alone, texts) if texts is not None else (together, cached)
        same = sum(x == y for x, y in zip(a, b))
        prefix = []
        for x, y in zip(a, b):
            if x != y:
                xa, ya = ids(x), ids(y)
                k = next((j for j, (u, v) in enumerate(zip(xa, ya)) if u != v), min(len(xa), len(ya)))
                prefix.append(k)
        rows.append({"measure": "agreement", "compare": what, "prompts": len(prompts), "identical": same,
                     "tokens_before_divergence_median": statistics.median(prefix) if prefix else None,
                     "max_tokens": n, "cache_hit_tokens": hits})
    return rows


def random_phi4_mini(out: str) -> str:
    """A Phi-4-mini-shaped checkpoint with random bf16 weights (hidden 3072, 32 layers, 24/8 heads, vocab 200064,
    tied embeddings, partial rotary 0.75) and the tiny phi4-mini tokenizer of tests/tiny.py (bytes and the
    real special tokens); every embedding row but printable ASCII bytes' is zero, so greedy replies are text.
    For speed only."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tokenizer

    tok = build_tokenizer("phi4-mini")
    cfg = Phi3Config(vocab_size=200064, max_position_embeddings=4096, tie_word_embeddings=True, partial_rotary_factor=0.75,
                     hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # Nothing but printable ASCII can win a greedy step: not ids past the tokenizer, not its special tokens, not a byte
    # of a multi-byte character (the stream holds those back until the character is whole, so they would be no text).
    keep = [i for i in range(len(tok)) if len(s := tok.decode([i])) == 1 and " " <= s <= "~"]
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        mask = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        mask[keep] = False
        w[mask] = 0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def transformers_cb(model_dir: str, clients: list[int], prompt_tokens: int, n: int) -> list[dict]:
    """The peer: transformers' own continuous batching (`generate_batch`, its paged cache and CUDA graphs) over the
    same weights, in this process: `clients` prompts of `prompt_tokens` random byte ids, n new tokens each."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    rows = []
    g = torch.Generator().manual_seed(0)
    for k in clients:
        prompts = [torch.randint(3, 250, (prompt_tokens,), generator=g).tolist() for _ in range(k)]
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=cfg)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        total = sum(len(o.generated_tokens) for o in out.values())
        rows.append({"measure": "concurrency", "side": "transformers-cb", "clients": k, "prompt_tokens": prompt_tokens, "max_tokens": n,
                     "output_tokens": total, "wall_s": round(wall, 3), "aggregate_tokens_per_s": round(total / wall, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens of the overhead measure (0: skip it)")
    ap.add_argument("--sides", nargs="*", default=["p1", "p4"], help="p1 (one at a time, no prompt cache) and pN (--parallel N)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--clients-per-process", type=int, default=CLIENTS_PER_PROCESS,
                    help="streams per client process (64: all in one process, as before session 36)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--client-tokens", type=int, default=256)
    ap.add_argument("--chat-turns", type=int, default=10, help="turns of the growing chat (0: skip it)")
    ap.add_argument("--chat-tokens", type=int, default=48)
    ap.add_argument("--chat-in-process", type=int, default=0, metavar="WORDS",
                    help="also run the chat in this process (chat_turns_local) with user turns of WORDS words")
    ap.add_argument("--agreement", action="store_true", help="also measure batched/cached vs alone replies in-process")
    ap.add_argument("--agree-prompts", type=int, default=16)
    ap.add_argument("--transformers-cb", action="store_true", help="also run the peer: transformers' continuous batching (CUDA)")
    ap.add_argument("--random-phi4-mini", metavar="DIR", default=None,
                    help="build a random Phi-4-mini-shaped checkpoint in DIR (if absent) and serve it")
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quant", default=None)
    ap.add_argument("--n-ctx", type=int, default=2048)
    add_out(ap)
    args = ap.parse_args()

    if args.random_phi4_mini:
        if not Path(args.random_phi4_mini, "config.json").exists():
            random_phi4_mini(args.random_phi4_mini)
        args.model = args.random_phi4_mini
    load = {k: v for k, v in dict(backend=args.backend, device=args.device, quant=args.quant).items() if v}
    model_args = [*(["--model", args.model] if args.model else []), "--n-ctx", str(args.n_ctx),
                  *[x for k, v in load.items() for x in (f"--{k}", v)]]
    env = {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_at_start": os.getloadavg()[0], **load}
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["torch"] = torch.__version__
    except ImportError:
        pass
    in_process = args.agreement or args.max_tokens or args.chat_in_process  # these load the model here
    if in_process:
        import phikit

        model = phikit.load(args.model, n_ctx=args.n_ctx, **load)
        env.update(model=model.name, backend=model.backend.name, quant=model.info().get("quant"))
    else:
        from phikit.models.registry import resolve

        env["model"] = resolve(args.model).name if args.model else "smollm2-135m"
    from phikit.serve.thread import free_port

    if args.agreement:
        prompts = [prompt_of(i, 24) for i in range(args.agree_prompts)]
        for row in agreement(model, prompts, 48):
            emit({**row, **env}, args.out)
    if args.max_tokens:
        url = start_server(free_port(), SIDES["p1"], model_args)
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
        finally:
            stop_server()
    if args.chat_in_process:
        r = chat_turns_local(model, args.chat_turns, args.chat_tokens, args.chat_in_process)
        emit({"measure": "chat_turns", "side": "in-process p4", "turns": args.chat_turns, **r, "turn1_ttft_s": r["ttft_s"][0],
              "last_turn_ttft_s": r["ttft_s"][-1], "last_over_first": round(r["ttft_s"][-1] / r["ttft_s"][0], 2), **env}, args.out)
    if in_process:
        model.backend.close()
        del model
    for side in args.sides:
        url = start_server(free_port(), side_flags(side), model_args)
        try:
            name = httpx_json(url + "/health")["model"]
            words = words_for(url, name, args.prompt_tokens)
            concurrent(url, name, 2, 8, words, first=10_000)  # warm-up
            first = 0
            for k in args.clients:
                emit({"measure": "concurrency", "side": side, "prompt_tokens": args.prompt_tokens, "max_tokens": args.client_tokens,
                      **concurrent(url, name, k, args.client_tokens, words, first, args.clients_per_process), **env}, args.out)
                first += k
            if args.chat_turns:
                ttft = chat_turns(url, name, args.chat_turns, args.chat_tokens, max(1, words // 3))
                emit({"measure": "chat_turns", "side": side, "turns": args.chat_turns, "ttft_s": [round(x, 4) for x in ttft],
                      "turn1_ttft_s": round(ttft[0], 4), "last_turn_ttft_s": round(ttft[-1], 4),
                      "last_over_first": round(ttft[-1] / ttft[0], 2), **env}, args.out)
        finally:
            stop_server()
    if args.transformers_cb:
        try:
            for row in transformers_cb(args.model, args.clients, args.prompt_tokens, args.client_tokens):
                emit({**row, **env}, args.out)
        except Exception as e:  # the peer failing is a result too
            emit({"measure": "concurrency", "side": "transformers-cb", "error": f"{type(e).__name__}: {e}"[:500], **env}, args.out)


def httpx_json(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=60).json()


if __name__ == "__main__":
    main()
