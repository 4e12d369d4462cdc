"""Batched generation (transformers backend) gives what one-by-one generation gives.

Real tiny models of the Phi and ChatML architectures, real tokenizers, prompts of
different lengths so rows are left-padded; greedy, so the outputs must match
token for token (random tiny models have no near-ties at fp32 rounding's scale).
The tiny tokenizers know only bytes and special tokens, so the LM head's rows past
them are zeroed: the model then writes bytes, and the texts are not empty.
"""

import json


import phikit
from phikit.engine.types import SamplingParams

# `tiny`: tests/engine/conftest.py
PROMPTS = ["Hi", "Tell me a long story about a dragon and a castle by the sea.", "2+2?",
           "What is the capital of France? Answer briefly please.", "ok"]


def one_by_one(m, prompts, params):
    return [m.generate(p, params) for p in prompts]


def test_batch_matches_one_by_one(tiny):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    batched = tiny.generate_batch(PROMPTS, params)
    single = one_by_one(tiny, PROMPTS, params)
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in single]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in single]
    assert all(r.total_s >= r.ttft_s > 0 for r in batched)
    assert sum(len(r.text) for r in batched) > 20


def test_generate_batch_keeps_its_batch_model_between_calls(tiny):
    """Evaluation calls generate_batch once per batch: the BatchModel (on CUDA a SlotBatch: its cache and graphs) is
    made once, every call's sequences leave it, and closing the backend drops it."""
    be = tiny.backend
    params = SamplingParams(max_tokens=6, temperature=0.0)
    first = tiny.generate_batch(PROMPTS[:3], params)
    bm = be._call_batch
    assert bm is not None and be.scheduler is None  # no engine thread left behind: single calls stay plain
    second = tiny.generate_batch(PROMPTS[:3], params)
    assert be._call_batch is bm and [r.text for r in second] == [r.text for r in first]
    if be.batching == "slots":
        assert len(bm.free) == len(bm.kv.keys[0]) - 1 and not bm.entries  # every slot back (no prompt cache here)
    be.close()
    assert be._call_batch is None


def test_batch_token_ids_match_the_stream_loop(tiny):
    """The scheduler's token ids, all prompts submitted at once, are the plain loop's (no stop ids: 10 each)."""
    from phikit.engine.scheduler import Scheduler
    from phikit.engine.backends.hf import HFBatch

    be = tiny.backend
    params = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = [be.encode(be.render([{"role": "user", "content": p}])) for p in PROMPTS]
    sch = Scheduler(HFBatch(be, 4096), parallel=len(prompts))
    try:
        streams = [sch.submit(ids, params, 10, set()) for ids in prompts]
        out_ids = [list(s) for s in streams]
    finally:
        sch.close()
    assert out_ids == [list(be._generate(ids, params, 10)) for ids in prompts]
    assert sch.steps < 10 * len(prompts)  # they ran together


def test_batch_stop_strings_cut_like_the_stream(tiny):
    free = one_by_one(tiny, PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    # a stop string taken from inside one reply: that row stops there, the others run on
    stop = free[1].text[3:6]
    assert stop.strip(), "the tiny model's reply is too short to cut"
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    batched = tiny.generate_batch(PROMPTS, params)
    single = one_by_one(tiny, PROMPTS, params)
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in single]
    assert batched[1].finish_reason == "stop" and stop not in batched[1].text


def test_seeded_sampling_in_a_batch_is_reproducible(tiny):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    a = [r.text for r in tiny.generate_batch(PROMPTS, params)]
    b = [r.text for r in tiny.generate_batch(PROMPTS, params)]
    assert a == b


def test_squad_eval_batched_equals_one_by_one(tiny_dirs, tmp_path):
    from phikit.eval.squad import evaluate

    ctx = "The Norse came from Denmark, Iceland and Norway in the 10th century. Their leader was Rollo."
    qas = [("q1", "Where did the Norse come from?", ["Denmark"]), ("q2", "Who led them?", ["Rollo"]),
           ("q3", "Who was king of France?", []), ("q4", "When?", ["10th century"]), ("q5", "Why?", [])]
    data = [{"title": "T", "paragraphs": [{"context": ctx, "qas": [
        {"id": i, "question": q, "answers": [{"text": a, "answer_start": 0} for a in ans], "is_impossible": not ans}
        for i, q, ans in qas]}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    m = phikit.load(str(tiny_dirs["phi3"]), backend="transformers", device="cpu")
    one = evaluate(m, path, max_tokens=8, progress=False, batch_size=1)
    four = evaluate(m, path, max_tokens=8, progress=False, batch_size=4)
    assert [r["prediction"] for r in one["records"]] == [r["prediction"] for r in four["records"]]
    assert [r["qid"] for r in four["records"]] == ["q1", "q2", "q3", "q4", "q5"]  # order kept
    assert one["metrics"]["f1"] == four["metrics"]["f1"]
    assert four["meta"]["batch_size"] == 4 and one["meta"]["batch_size"] == 1
