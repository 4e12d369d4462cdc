"""Continuous batching (engine/scheduler.py): requests that run together give what each gives alone.

Tiny random models of the real architectures on transformers in fp32, greedy or seeded: joined
batches, prompt-cache hits and preempted sequences must give the exact tokens of a request run
alone (the LM head's rows past the tiny tokenizer's vocabulary are zeroed so replies are text).
The embedded GGUF on llama.cpp runs its batch kernels: there the tests check what the engine
must do (every request answered, the cache reused, grammar and logprobs per sequence), and the
agreement with single runs is measured in benchmarks/speed/serve_concurrency.py.
"""

import json
import threading

import pytest

import phikit
from phikit.engine.types import SamplingParams, join
from phikit.errors import PhikitError

# `tiny`: tests/engine/conftest.py
PROMPTS = ["Hi", "Tell me a long story about a dragon and a castle by the sea.", "2+2?",
           "What is the capital of France? Answer briefly please.", "ok"]


def ids_of(be, text: str) -> list[int]:
    return be.encode(be.render([{"role": "user", "content": text}]))


def alone(be, ids, params, n):
    return list(be._generate(ids, params, n))


def test_requests_joining_mid_generation_get_their_own_tokens(tiny):
    be = tiny.backend
    be.enable_batching(3, prompt_cache=False)
    sch = be.scheduler
    greedy = SamplingParams(temperature=0.0)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    plan = [(PROMPTS[1], greedy, 12), (PROMPTS[0], seeded, 9), (PROMPTS[3], greedy, 5), (PROMPTS[2], seeded, 7), (PROMPTS[4], greedy, 10)]
    got: dict[int, list[int]] = {}
    streams = {}
    # Start the first, read a few tokens, then start the next: each joins a batch already decoding.
    for i, (text, params, n) in enumerate(plan):
        streams[i] = sch.submit(ids_of(be, text), params, n, set())
        got[i] = [next(streams[i]) for _ in range(2)]
    for i, s in streams.items():
        got[i] += list(s)
    for i, (text, params, n) in enumerate(plan):
        assert got[i] == alone(be, ids_of(be, text), params, n), plan[i]
    assert sch.stats()["running"] == 0 and sch.stats()["waiting"] == 0


def test_prompt_cache_reuses_the_earlier_turns_and_changes_nothing(tiny):
    be = tiny.backend
    be.enable_batching(2, prompt_cache=True)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    chat = [{"role": "user", "content": PROMPTS[1]}]
    first = tiny.generate(chat, params)
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second = tiny.generate(chat, params)
    st = be.scheduler.stats()
    assert st["cache_hit_tokens"] >= first.prompt_tokens  # the whole first prompt came from the cache
    be.close()
    assert tiny.generate(chat, params).text == second.text  # the same reply without any cache


SYSTEM = "You are a careful assistant. Answer in one short sentence, and say so when you do not know. " * 2


def test_a_prompt_shares_the_prefix_of_a_request_still_running(tiny):
    """Two requests with one system prompt at once: the second reads only its own question (on transformers a copy
    of the first one's cache rows), and both replies are the ones they get alone."""
    be = tiny.backend
    be.enable_batching(2, prompt_cache=True)
    sch = be.scheduler
    params = SamplingParams(temperature=0.0)
    a_ids, b_ids = (be.encode(be.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]))
                    for q in (PROMPTS[1], PROMPTS[3]))
    shared = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y)
    a = sch.submit(a_ids, params, 8, set())
    got_a = [next(a), next(a)]  # a is decoding: its prompt is in the batch's cache
    hits0 = sch.stats()["cache_hit_tokens"]
    b = sch.submit(b_ids, params, 8, set())
    got_b = list(b)
    got_a += list(a)
    assert sch.stats()["cache_hit_tokens"] - hits0 == shared
    assert got_a == alone(be, a_ids, params, 8) and got_b == alone(be, b_ids, params, 8)


def test_preempted_sequences_come_back_with_the_same_tokens(tiny_rows):
    """(HFBatch; a running sequence owns its slot in SlotBatch, which never preempts: test_slots_* cover its limits.)"""
    tiny = tiny_rows
    be = tiny.backend
    prompts = [ids_of(be, p) for p in PROMPTS[:4]]
    n = 12
    # Room for two sequences' prompts and replies, not four: the latest are preempted and run again later.
    be.enable_batching(4, kv_tokens=max(len(p) for p in prompts) * 2 + 2 * n, prompt_cache=False)
    sch = be.scheduler
    params = SamplingParams(temperature=1.0, seed=3)
    streams = [sch.submit(ids, params, n, set()) for ids in prompts]
    got = [list(s) for s in streams]
    assert got == [alone(be, ids, params, n) for ids in prompts]
    assert sch.stats()["preemptions"] > 0


def test_a_request_longer_than_the_cache_fails_alone(tiny_rows):
    tiny = tiny_rows
    be = tiny.backend
    be.enable_batching(2, kv_tokens=64, prompt_cache=False)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    ok = be.scheduler.submit(ids_of(be, "ok"), params, 6, set())
    with pytest.raises(PhikitError, match="KV cache"):
        be.scheduler.submit(list(range(3, 70)), params, 6, set())
    assert list(ok) == alone(be, ids_of(be, "ok"), params, 6)


def test_a_closed_stream_frees_its_place(tiny):
    be = tiny.backend
    be.enable_batching(1, prompt_cache=False)
    params = SamplingParams(temperature=0.0)
    a = be.scheduler.submit(ids_of(be, PROMPTS[1]), params, 400, set())
    next(a)
    a.close()  # the reader went away: the next request gets the one place
    b = be.scheduler.submit(ids_of(be, "ok"), params, 4, set())
    assert list(b) == alone(be, ids_of(be, "ok"), params, 4)


def test_a_watched_reader_never_waits_and_is_told_of_each_item():
    from phikit.engine.scheduler import _END, PENDING, Seq, TokenReader

    class Sch:  # what a reader uses of its Scheduler
        cv = threading.Condition()

    seq = Seq([1, 2], SamplingParams(), 4, set())
    reader = TokenReader(Sch(), seq)
    told = []
    reader.watch(lambda: told.append(1))
    assert next(reader) is PENDING  # nothing made yet: no wait
    seq.put(7)
    seq.put(8)
    assert told == [1, 1] and next(reader) == 7 and next(reader) == 8 and next(reader) is PENDING
    seq.put(_END)
    with pytest.raises(StopIteration):
        next(reader)
    assert seq.gone and seq.notify is None


def test_a_watched_stream_gives_the_text_of_a_waiting_one(tiny):
    """Pulled without ever waiting (as the server's event loop does), a stream's chunks are those of a plain read."""
    from phikit.engine.scheduler import PENDING

    be = tiny.backend
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = tiny.generate(PROMPTS[1], params).text
    be.enable_batching(2, prompt_cache=False)
    stream = tiny.stream(PROMPTS[1], params)
    chunks = [next(stream)]  # the first chunk waits (the prompt's prefill), as Lease.start does
    woke = threading.Event()
    stream.reader.watch(woke.set)
    for _ in range(10_000):
        c = next(stream, None)
        if c is None:
            break
        if c is PENDING:
            assert woke.wait(30)
            woke.clear()
            continue
        chunks.append(c)
    assert join(iter(chunks), "m").text == want and chunks[-1].finish_reason == "length"


def test_streams_from_many_threads_equal_their_single_runs(tiny):
    """The full stream (stop strings, detokenising) on callers' threads, the model on the engine thread."""
    be = tiny.backend
    params = SamplingParams(max_tokens=10, temperature=0.0)
    single = [tiny.generate(p, params).text for p in PROMPTS]
    stop = single[1][2:4]
    single_stop = [tiny.generate(p, SamplingParams(max_tokens=10, temperature=0.0, stop=[stop])).text for p in PROMPTS]
    be.enable_batching(3, prompt_cache=True)
    out: dict[int, str] = {}

    def run(i):
        p = SamplingParams(max_tokens=10, temperature=0.0, stop=[stop] if i % 2 else [])
        out[i] = join(tiny.stream(PROMPTS[i], p), "m").text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert [out[i] for i in range(len(PROMPTS))] == [single_stop[i] if i % 2 else single[i] for i in range(len(PROMPTS))]


def test_slots_refuse_a_request_longer_than_a_slot(tiny_slots):
    be = tiny_slots.backend
    with pytest.raises(PhikitError, match="lower --parallel or raise --kv-tokens"):
        be.enable_batching(2, kv_tokens=4 * 100)  # 4 slots (2 running, 2 cached) of 100 tokens: too small to be useful
    be.enable_batching(2, kv_tokens=4 * 256, prompt_cache=False)
    params = SamplingParams(temperature=0.0)
    ok = be.scheduler.submit(ids_of(be, "ok"), params, 6, set())
    with pytest.raises(PhikitError, match="holds 256 for one request.*lower --parallel"):
        be.scheduler.submit(list(range(3, 300)), params, 6, set())
    assert list(ok) == alone(be, ids_of(be, "ok"), params, 6)


def test_slots_run_out_and_cached_prefixes_make_room(tiny_slots):
    """One running sequence, two slots: every finished request stays cached until a new one needs its slot (least
    recently used first); a returning chat takes its own prefix back; replies stay those of single runs."""
    be = tiny_slots.backend
    be.enable_batching(1, prompt_cache=True)
    sch = be.scheduler
    params = SamplingParams(temperature=0.0)
    first = [ids_of(be, p) for p in PROMPTS[:3]]
    got = [list(sch.submit(ids, params, 6, set())) for ids in first]  # the third evicts the first's slot
    assert got == [alone(be, ids, params, 6) for ids in first]
    hits = sch.stats()["cache_hit_tokens"]
    again = first[2] + got[2] + ids_of(be, "more")[1:]  # the third chat goes on: its slot is still cached
    assert list(sch.submit(again, params, 6, set())) == alone(be, again, params, 6)
    assert sch.stats()["cache_hit_tokens"] - hits >= len(first[2]) + len(got[2]) - 1
    assert len(sch.model.free) + len(sch.model.entries) == 2


def test_compiled_slot_step_writes_the_cache_in_place_and_compiles_twice(tiny_dirs):
    """The GPU's decode step through torch.compile (here on the CPU, without graphs): the same logits and cache as the
    eager step for 1, 2, 4 and 3 rows; two compiled graphs (rows 1, then any number: automatic dynamic shapes);
    and no buffer the size of a layer's cache in the compiled code: each layer's write stays in place (the pair
    index_copy_ + attention operator had been compiled into a copy of the whole cache per layer and step)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from phikit.engine.backends.slot_batch import SlotBatch

    m = phikit.load(str(tiny_dirs["phi4-mini"]), backend="transformers", device="cpu")
    eager = SlotBatch(m.backend, 4, kv_tokens=8 * 256)
    compiled = SlotBatch(m.backend, 4, kv_tokens=8 * 256, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    steps = [([0], [3], [5]), ([0, 1], [4, 0], [6, 7]), ([0, 1, 2, 3], [5, 1, 9, 2], [8, 9, 10, 11]), ([3, 1, 2], [3, 2, 10], [1, 2, 3])]
    with torch.inference_mode():
        for i, (slots, positions, tokens) in enumerate(steps):
            want = eager._decode(slots, positions, tokens)
            if i == 0:
                got, code = run_and_get_code(compiled._decode, slots, positions, tokens)
            else:
                got = compiled._decode(slots, positions, tokens)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.kv.keys + eager.kv.values, compiled.kv.keys + compiled.kv.values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    shape = ", ".join(map(str, compiled.kv.keys[0].shape))
    assert "slot_write_attention" in "".join(code)
    allocations = [line for line in "".join(code).splitlines() if "empty_strided" in line]
    assert allocations and not [line for line in allocations if f"(({shape})" in line]  # a buffer shaped like the cache
    torch._dynamo.reset()


def test_scripted_backend_runs_one_at_a_time_behind_the_scheduler():
    from tiny import scripted_model

    m = scripted_model("phi3", ["first reply", "second reply"])
    st = m.backend.enable_batching(4)
    assert st["parallel"] == 1  # it cannot batch: one sequence at a time, on the engine thread
    texts = [m.generate("hi").text, m.generate("hi again").text]
    assert texts == ["first reply", "second reply"]
    m.backend.close()


@pytest.fixture(scope="module")
def smol():
    m = phikit.load()
    m.backend.enable_batching(4, prompt_cache=True)
    yield m
    m.backend.close()


def test_llamacpp_runs_requests_together(smol):
    sch = smol.backend.scheduler
    before = sch.steps
    params = SamplingParams(max_tokens=24, temperature=0.0)
    res = smol.generate_batch(["Why is the sky blue?", "Name three fruits.", "What is 2+2?", "Say hello."], params)
    assert all(r.text.strip() and r.completion_tokens > 0 for r in res)
    assert sch.steps - before < sum(r.completion_tokens for r in res)  # steps carried several sequences
    again = smol.generate_batch(["Why is the sky blue?", "Name three fruits."], params)
    assert sch.stats()["cache_hit_tokens"] > 0
    assert [r.completion_tokens > 0 for r in again] == [True, True]


def test_llamacpp_shares_a_running_prompt_prefix(smol):
    be = smol.backend
    sch = be.scheduler
    params = SamplingParams(temperature=0.0)
    a_ids, b_ids = (be.encode(be.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]))
                    for q in ("Name three rivers.", "Name three mountains."))
    shared = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y)
    a = sch.submit(a_ids, params, 12, set())
    next(a)
    hits0 = sch.stats()["cache_hit_tokens"]
    b = sch.submit(b_ids, params, 12, set())
    got_b = list(b)
    list(a)
    assert sch.stats()["cache_hit_tokens"] - hits0 >= shared
    assert be.decode(got_b).strip()


def test_llamacpp_grammar_and_logprobs_per_sequence(smol):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}}, "required": ["name"]}
    params_json = SamplingParams(max_tokens=80, temperature=0.0, json_schema=schema)
    params_lp = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, prompt_logprobs=2)
    out = {}

    def run(key, text, params):
        out[key] = list(smol.stream(text, params))

    threads = [threading.Thread(target=run, args=("json", "Give a name as JSON.", params_json)),
               threading.Thread(target=run, args=("lp", "Say hello.", params_lp)),
               threading.Thread(target=run, args=("plain", "Name a color.", SamplingParams(max_tokens=12, temperature=0.0)))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert isinstance(json.loads("".join(c.text for c in out["json"]))["name"], str)
    lps = [lp for c in out["lp"] for lp in (c.logprobs or [])]
    assert len(lps) == sum(len(c.token_ids) for c in out["lp"]) > 0
    assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in lps)
    prompt = out["lp"][0].prompt_logprobs
    assert prompt[0].logprob is None and all(lp.logprob <= 0 and len(lp.top) == 2 for lp in prompt[1:])
    assert "".join(c.text for c in out["plain"]).strip()


def test_llamacpp_without_its_scheduler_runs_as_before():
    """Closing the scheduler (a server unloading, a benchmark switching) leaves the plain loop working."""
    m = phikit.load()
    params = SamplingParams(max_tokens=8, temperature=0.0)
    before = m.generate("Say hello.", params).text
    m.backend.enable_batching(2)
    assert m.generate("Say hello.", params).text.strip()
    m.backend.close()
    assert m.generate("Say hello.", params).text == before


def test_llamacpp_repeated_greedy_requests_get_the_same_text_from_the_prompt_cache():
    """The second and third asking hit the prompt cache and read only the prompt's end; on llama.cpp that end is two
    tokens at least, so its last row goes through the products a fresh prompt's does (one row alone rounds
    differently with the batching copy's bf16 weights: "Say hello." then got another greeting)."""
    m = phikit.load()
    m.backend.enable_batching(4, 2048)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    try:
        for q in ("Say hello.", "What is the capital of France?", "Write a haiku about rain.", "Why do cats purr?"):
            first = m.generate(q, params).text
            assert [m.generate(q, params).text for _ in range(2)] == [first, first], q
        assert m.backend.scheduler.stats()["cache_hit_tokens"] > 0
    finally:
        m.backend.close()


def test_ignore_eos_makes_exactly_max_tokens(smol):
    """vLLM's ignore_eos: the model's end tokens do not end the reply (benchmarks use it for fixed lengths)."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    r = smol.generate("Say hi.", params)
    assert (r.completion_tokens, r.finish_reason) == (40, "length")
    short = smol.generate("Say hi.", SamplingParams(max_tokens=40, temperature=0.0))
    assert short.completion_tokens < 40 and short.finish_reason == "stop"  # the same prompt ends on its own without it


def test_llamacpp_short_turn_after_a_long_history_reads_through_tiled_attention(monkeypatch):
    """A chat turn of fewer than 64 new tokens after a cached history re-reads the history's last tokens, so
    llama.cpp's flash attention takes its tiled path (backends/llamacpp.py, TILED_ROWS): the step holds 64
    tokens, each the prompt's own token at its own position (llama.cpp refuses positions that do not follow
    the sequence's cells), and the next token is the one the row-by-row path picks. (The two paths' log-
    probabilities differ by up to ~0.4 here, as much as a fresh read's differ from either: no closer check.)"""
    from phikit.engine.backends import llamacpp

    history = [{"role": "system", "content": SYSTEM * 12}, {"role": "user", "content": "Name a river."},
               {"role": "assistant", "content": "The Nile is a river in Africa."}]
    turn = history + [{"role": "user", "content": "And now name a mountain, a lake and a desert of the same "
                                                  "continent, each with one fact about it, in the order of "
                                                  "their size, and say which of them you would visit first."}]

    def second_turn(cost: float):
        monkeypatch.setattr(llamacpp, "ROW_PATH_COST", cost)
        m = phikit.load()
        m.backend.enable_batching(2, prompt_cache=True)
        bm, steps, firsts = m.backend.scheduler.model, [], []
        forward, sample = bm.forward, bm.sample

        def read(work):  # what llama.cpp was given: (token, position) of each batch entry
            out = forward(work)
            b = bm.batch
            steps.append([(b.token[i], b.pos[i]) for i in range(b.n_tokens)])
            return out

        bm.forward = read
        bm.sample = lambda seq, row: (firsts.append(int(bm._row(row).argmax())), sample(seq, row))[1]
        m.generate(history, max_tokens=1, temperature=0.0)
        steps.clear(), firsts.clear()
        m.generate(turn, max_tokens=1, temperature=0.0)
        ids = m.backend.encode(m.backend.render(turn))
        m.backend.close()
        return steps, firsts[0], ids

    steps, tiled, ids = second_turn(llamacpp.ROW_PATH_COST)
    assert len(steps) == 1 and len(steps[0]) == llamacpp.TILED_ROWS
    assert steps[0] == [(ids[p], p) for p in range(len(ids) - llamacpp.TILED_ROWS, len(ids))]
    steps, by_row, _ = second_turn(0.0)  # never re-read: the row-by-row path
    assert len(steps) == 1 and 1 < len(steps[0]) < llamacpp.TILED_ROWS
    assert tiled == by_row
