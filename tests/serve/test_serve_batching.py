"""phikit serve --parallel N: many clients at once through one model, as the official clients send them.

The embedded model on llama.cpp behind a server that batches (4 places, prompt cache on), and the
tiny transformers model where replies must equal single runs exactly.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from phikit.serve import Limits, ServeConfig, create_app  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
QUESTIONS = ["Why is the sky blue?", "Name three fruits.", "What is 2+2?", "Write a haiku about snow.",
             "What is the capital of France?", "Say hello."]


@pytest.fixture(scope="module")
def model(embedded_gguf):
    import phikit

    m = phikit.load(n_ctx=1024)
    yield m
    m.backend.close()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, ServeConfig(parallel=4, prompt_cache=True, limits=Limits(max_tokens=256, max_n=4)))
    with ServerThread(app) as srv:
        yield srv


def test_concurrent_streams_all_answer_and_share_steps(server, model):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    sch = model.backend.scheduler
    steps0 = sch.steps

    async def one(q):
        text, n = "", 0
        stream = await client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": q}],
                                                      max_tokens=24, temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for ev in stream:
            if ev.choices and ev.choices[0].delta.content:
                text += ev.choices[0].delta.content
            if ev.usage:
                n = ev.usage.completion_tokens
        return text, n

    async def main():
        return await asyncio.gather(*(one(q) for q in QUESTIONS))

    got = asyncio.run(main())
    assert all(t.strip() and n > 0 for t, n in got)
    assert sch.steps - steps0 < sum(n for _, n in got)  # decode steps carried several requests
    h = httpx.get(server.url + "/health").json()
    assert h["parallel"] == 4 and h["running"] == 0 and h["kv_capacity_tokens"] >= 1024
    metrics = httpx.get(server.url + "/metrics").text
    assert "phikit_engine_cache_hit_tokens_total" in metrics and "phikit_engine_batch_size" in metrics


def test_ignore_eos_through_the_openai_sdk(server, model):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Say hi."}], max_tokens=40,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def test_a_failing_request_fails_alone(server, model):
    """A prompt over the context is a 400 while the requests beside it run to the end."""
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    results: dict[str, object] = {}

    def good(i):
        r = oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": QUESTIONS[i]}], max_tokens=16,
                                        temperature=0)
        results[f"good{i}"] = r.choices[0].message.content

    def bad():
        try:
            oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=8)
        except openai.BadRequestError as e:
            results["bad"] = e.status_code

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)] + [threading.Thread(target=bad)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert results["bad"] == 400
    assert all(results[f"good{i}"].strip() for i in range(3))


def test_n_choices_generate_together(server, model):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    sch = model.backend.scheduler
    steps0 = sch.steps
    r = oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Tell me a story."}], n=3,
                                    max_tokens=20, temperature=0.8, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content for c in r.choices)
    assert sch.steps - steps0 < r.usage.completion_tokens
    chunks = list(oai.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Count to five."}], n=2,
                                              max_tokens=12, temperature=0, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_a_client_that_leaves_frees_its_place(server, model):
    """Four clients read two chunks of a long reply each and hang up; a fifth still gets its answer at once."""
    sch = model.backend.scheduler
    for _ in range(4):
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json={"model": model.name, "messages": [{"role": "user", "content": "Write a long essay."}],
                                "max_tokens": 250, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": model.name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    deadline = time.monotonic() + 10
    while sch.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sch.stats()["running"] == 0  # nothing left generating for the clients that left
    assert time.monotonic() - t0 < 30


def test_transformers_batched_replies_equal_single_ones(tiny_dirs):
    """The tiny phi3 model in fp32: each concurrent reply through the server is the one it gets alone."""
    import phikit

    m = phikit.load(str(tiny_dirs["phi3"]), backend="transformers", device="cpu")
    be = m.backend
    be.model.get_output_embeddings().weight.data[len(be.tokenizer):] = 0
    from phikit.engine.types import SamplingParams

    alone = [m.generate(q, SamplingParams(max_tokens=10, temperature=0)).text for q in QUESTIONS]
    app = create_app(m, ServeConfig(parallel=3, prompt_cache=True))
    try:
        with ServerThread(app) as srv:
            async def main():
                client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

                async def one(q):
                    r = await client.chat.completions.create(model=m.name, messages=[{"role": "user", "content": q}],
                                                             max_tokens=10, temperature=0)
                    return r.choices[0].message.content
                return await asyncio.gather(*(one(q) for q in QUESTIONS))

            assert asyncio.run(main()) == alone
            assert asyncio.run(main()) == alone  # again, now from the prompt cache
            assert be.scheduler.stats()["cache_hit_tokens"] > 0
    finally:
        be.close()


def test_wakeups_hand_every_stream_its_chunks_in_order_with_few_wakeups():
    """Chunks posted from many threads reach each stream's queue in the order posted, and the loop is woken
    once for all that were waiting (not once a chunk); a closed loop refuses with RuntimeError."""
    from phikit.serve.worker import _Wakeups

    async def run():
        loop = asyncio.get_running_loop()
        w = _Wakeups(loop)
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: calls.append(a) or real(*a)
        queues = [asyncio.Queue() for _ in range(8)]
        gate = threading.Barrier(8)

        def pump(q):
            gate.wait()
            for n in range(500):
                w.post(q, n)

        threads = [threading.Thread(target=pump, args=(q,)) for q in queues]
        for t in threads:
            t.start()
        for t in threads:  # the loop is held here: every post waits for one delivery
            t.join()
        got = [[await q.get() for _ in range(500)] for q in queues]
        assert got == [list(range(500))] * 8
        assert len(calls) == 1
        w.post(queues[0], "next")  # the list was emptied: the next post wakes the loop again
        assert await queues[0].get() == "next" and len(calls) == 2
        return w

    w = asyncio.run(run())
    with pytest.raises(RuntimeError, match="closed"):
        w.post(asyncio.Queue(), 1)
