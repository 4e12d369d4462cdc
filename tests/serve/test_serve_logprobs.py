"""Log-probabilities and token-id prompts on /v1/completions and /v1/chat/completions, as real
clients use them: the `openai` client, raw HTTP in the shapes lm-evaluation-harness sends, the
openai backend re-reading them, and lm-eval itself (local-completions, loglikelihood and
generate_until) against a live server on the embedded model.

Numbers are checked against the engine's own stream (tests/engine/test_logprobs.py checks that
against independent computations) and against each other: an echo of context + continuation
holds the context's own scores, greedy tokens are the top ones, a stream says what a blocking
reply says.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import phikit  # noqa: E402
from phikit.engine.types import SamplingParams  # noqa: E402
from phikit.errors import PhikitError  # noqa: E402
from phikit.serve import Limits, ServeConfig, create_app  # noqa: E402
from phikit.serve.thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.e2e
HI = [{"role": "user", "content": "Say hello."}]
CONTEXT, CONTINUATION = "The capital of France is", " Paris, a city"


@pytest.fixture(scope="module")
def model(embedded_gguf):
    return phikit.load(n_ctx=1024)


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(create_app(model, ServeConfig(limits=Limits(max_tokens=256, max_n=4)))) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(http, model, path, **body):
    r = http.post(path, json={"model": model.name, **body})
    return r.status_code, r.json()


def _sse(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# -- /v1/completions ------------------------------------------------------------------------


def test_token_id_prompts(http, model):
    be = model.backend
    ids = be.encode(CONTEXT)
    _, by_text = _post(http, model, "/v1/completions", prompt=CONTEXT, max_tokens=6, temperature=0)
    _, one = _post(http, model, "/v1/completions", prompt=ids, max_tokens=6, temperature=0)
    _, batch = _post(http, model, "/v1/completions", prompt=[ids, be.encode("1, 2, 3,")], max_tokens=6, temperature=0)
    assert one["choices"][0]["text"] == by_text["choices"][0]["text"] == batch["choices"][0]["text"]
    assert one["usage"]["prompt_tokens"] == len(ids) and len(batch["choices"]) == 2
    assert batch["choices"][1]["text"].strip()


@pytest.mark.parametrize("prompt, where", [([1, 2, 10**9], "'prompt'"), ([[5], [-1]], "'prompt.1'"), ([[5], [49152]], "'prompt.1'")])
def test_out_of_range_ids_are_a_400_naming_prompt(http, model, prompt, where):
    status, body = _post(http, model, "/v1/completions", prompt=prompt, max_tokens=2)
    assert status == 400 and body["error"]["param"] == "prompt"
    assert where in body["error"]["message"] and "vocabulary" in body["error"]["message"]


@pytest.mark.parametrize("body, param", [
    (dict(prompt=[[]], max_tokens=2), "prompt.0"),
    (dict(prompt=[True, 3], max_tokens=2), "prompt"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=2, logprobs=6), "logprobs"),
    (dict(prompt="hi", max_tokens=2, logprobs=-1), "logprobs"),
])
def test_bad_completion_requests(http, model, body, param):
    status, out = _post(http, model, "/v1/completions", **body)
    assert status == 400 and out["error"]["param"].startswith(param), out


def test_echo_scores_the_prompt(http, model):
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 0 (or 1, whose token it drops)."""
    be = model.backend
    ids = be.encode(CONTEXT + CONTINUATION)
    status, out = _post(http, model, "/v1/completions", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert status == 200, out
    ch = out["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"] == CONTEXT + CONTINUATION and ch["finish_reason"] == "length"
    assert lp["tokens"] == [be.token_piece(i).decode() for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [x.logprob for x in be.prompt_logprobs(ids, 0)]
    assert lp["token_logprobs"][1:] == pytest.approx(want[1:], abs=1e-9)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(ids))]
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    for tok, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[tok] == value and max(top.values()) >= value and len(top) <= 2  # the top one and the token itself

    # the shape lm-eval sends: max_tokens 1; the prompt's scores are the same, one generated token follows
    _, one = _post(http, model, "/v1/completions", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234)
    lp1 = one["choices"][0]["logprobs"]
    assert lp1["token_logprobs"][: len(ids)] == lp["token_logprobs"] and len(lp1["tokens"]) == len(ids) + 1
    assert one["choices"][0]["text"].startswith(CONTEXT + CONTINUATION)

    # the continuation's score read from the echo of context + continuation does not depend on how the context is sent
    n_ctx = len(be.encode(CONTEXT))
    _, ctx = _post(http, model, "/v1/completions", prompt="The capital of France is", max_tokens=0, echo=True, logprobs=0)
    assert ctx["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:n_ctx], abs=1e-4, nan_ok=True)
    score = sum(lp["token_logprobs"][n_ctx:])
    assert -60 < score < 0


def test_generated_logprobs_blocking_and_streamed(http, model):
    body = dict(prompt=CONTEXT, max_tokens=6, temperature=0, logprobs=2)
    _, out = _post(http, model, "/v1/completions", **body)
    ch = out["choices"][0]
    lp = ch["logprobs"]
    assert "".join(lp["tokens"]) == ch["text"] and len(lp["tokens"]) == out["usage"]["completion_tokens"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(lp["tokens"]))]
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value == max(top.values()) == top[tok] and len(top) == 2  # greedy: the likeliest; 2 alternatives
    # the engine's own stream gives the same numbers
    here = [x for c in model.backend.stream_prompt(CONTEXT, SamplingParams(max_tokens=6, temperature=0, logprobs=2)) for x in c.logprobs or []]
    assert lp["token_logprobs"] == [x.logprob for x in here]

    events = _sse(http.post("/v1/completions", json={"model": model.name, "stream": True, "echo": True, **body}).text)
    first = events[0]["choices"][0]
    assert first["text"] == CONTEXT and first["logprobs"]["token_logprobs"][0] is None
    streamed = [e["choices"][0]["logprobs"] for e in events[1:] if e["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == lp["tokens"]
    assert [v for s in streamed for v in s["token_logprobs"]] == lp["token_logprobs"]
    offsets = [o for s in streamed for o in s["text_offset"]]
    assert offsets == [len(CONTEXT) + o for o in lp["text_offset"]]  # after the echoed prompt's tokens
    assert "".join(e["choices"][0]["text"] for e in events) == CONTEXT + ch["text"]


def test_openai_client_completions_logprobs(oai, model):
    ids = model.backend.encode(CONTEXT)
    r = oai.completions.create(model=model.name, prompt=[ids], max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert r.choices[0].text == CONTEXT
    r = oai.completions.create(model=model.name, prompt=CONTEXT, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None  # not asked for: null, as OpenAI answers


# -- /v1/chat/completions -------------------------------------------------------------------


def test_chat_logprobs_blocking_and_streamed(oai, model):
    r = oai.chat.completions.create(model=model.name, messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert bytes(b for t in content for b in t.bytes).decode() == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.logprob <= 0
    here = [x for c in model.stream(HI, max_tokens=8, temperature=0, logprobs=3) for x in c.logprobs or []]
    assert [t.logprob for t in content] == [x.logprob for x in here]

    chunks = list(oai.chat.completions.create(model=model.name, messages=HI, max_tokens=8, temperature=0, logprobs=True, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob, t.top_logprobs) for t in streamed] == [(t.token, t.logprob, []) for t in content]

    plain = oai.chat.completions.create(model=model.name, messages=HI, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_chat_logprobs_are_raw_whatever_the_temperature(oai, model):
    hot = oai.chat.completions.create(model=model.name, messages=HI, max_tokens=1, temperature=1.9, top_p=0.2, seed=5,
                                      logprobs=True, top_logprobs=5)
    cold = oai.chat.completions.create(model=model.name, messages=HI, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    tops = [[(x.token, x.logprob) for x in r.choices[0].logprobs.content[0].top_logprobs] for r in (hot, cold)]
    assert tops[0] == tops[1]
    assert math.fsum(math.exp(v) for _, v in tops[1]) <= 1 + 1e-9


@pytest.mark.parametrize("body, param", [
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), "logprobs"),
    (dict(logprobs="yes"), "logprobs"),
])
def test_bad_chat_logprobs_requests(http, model, body, param):
    status, out = _post(http, model, "/v1/chat/completions", messages=HI, max_tokens=2, **body)
    assert status == 400 and out["error"]["param"] == param, out


# -- the openai backend passes them on ----------------------------------------------------------


def test_remote_backend_passes_logprobs_on(server, model):
    remote = phikit.load(backend="openai", base_url=server.url)
    ids = model.backend.encode(CONTEXT + CONTINUATION)
    there = list(remote.backend.stream_prompt(ids, SamplingParams(max_tokens=0, prompt_logprobs=1)))
    here = model.backend.prompt_logprobs(ids, 1)
    assert [(x.token, x.logprob) for x in there[0].prompt_logprobs] == [(x.token, x.logprob) for x in here]
    chunks = list(remote.stream(HI, max_tokens=6, temperature=0, logprobs=2))
    got = [x for c in chunks for x in c.logprobs or []]
    want = [x for c in model.stream(HI, max_tokens=6, temperature=0, logprobs=2) for x in c.logprobs or []]
    assert [(x.token, x.logprob, [t.token for t in x.top]) for x in got] == [(x.token, x.logprob, [t.token for t in x.top]) for x in want]
    raw = [x for c in remote.backend.stream_prompt(CONTEXT, SamplingParams(max_tokens=4, temperature=0, logprobs=1)) for x in c.logprobs or []]
    assert [x.token for x in raw] and all(x.id is None and x.logprob <= 0 for x in raw)


def test_remote_backend_without_logprobs_upstream_is_a_400_naming_it():
    """An upstream that answers without logprobs (an older server, or one that ignores the field)."""
    from phikit.engine.backends.openai_remote import OpenAIRemoteBackend

    def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions") and b'"stream": true' not in request.content.replace(b'"stream":true', b'"stream": true'):
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}],
                                             "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
        event = {"choices": [{"index": 0, "text": "x", "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}]}
        return httpx.Response(200, text=f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n", headers={"content-type": "text/event-stream"})

    be = OpenAIRemoteBackend("http://upstream/v1", "m")
    be.client = httpx.Client(base_url="http://upstream/v1", transport=httpx.MockTransport(upstream))
    for run in (lambda: list(be.stream(HI, SamplingParams(max_tokens=2, logprobs=1))),
                lambda: list(be.stream_prompt("hi", SamplingParams(max_tokens=2, logprobs=1))),
                lambda: list(be.stream_prompt("hi", SamplingParams(max_tokens=0, prompt_logprobs=1)))):
        with pytest.raises(PhikitError, match="the openai backend: the server at http://upstream/v1 answered without log-probabilities") as e:
            run()
        assert e.value.status == 400
    assert "".join(c.text for c in be.stream(HI, SamplingParams(max_tokens=2))) == "x"  # not asked for: fine


# -- lm-evaluation-harness itself ---------------------------------------------------------------

MC = [  # lm-eval puts its target_delimiter, a space, between question and choice
    {"question": "The capital of France is", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "purple", "orange"], "answer": 1},
    {"question": "Two plus two equals", "choices": ["seven", "nine", "four", "eleven"], "answer": 2},
]
GEN = [{"question": "The capital of France is", "answer": "Paris"}, {"question": "The capital of Italy is", "answer": "Rome"}]
TASKS = {
    "phikit_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                 "metric_list:\n  - metric: acc\n",
    "phikit_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: ' {{answer}}'\n"
                  "generation_kwargs:\n  until: ['\\n', '.', ',']\n  max_gen_toks: 8\n  do_sample: false\n"
                  "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n    regexes_to_ignore: [' ']\n",
}


def _task_dir(root):
    """A task folder lm-eval reads with --include_path: two YAML tasks over local JSONL files."""
    for name, rows in (("phikit_mc", MC), ("phikit_gen", GEN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {root / (name + '.jsonl')}\ntest_split: test\n{TASKS[name]}")
    return root


@pytest.fixture(scope="module")
def hf_tokenizer(embedded_gguf, tmp_path_factory):
    """The embedded model's tokenizer as a Hugging Face tokenizer folder, built from the GGUF's own vocabulary
    (what a user passes to lm-eval as tokenizer=...; about 20 s)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(embedded_gguf), gguf_file=os.path.basename(embedded_gguf))
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_lm_eval_local_completions(server, model, hf_tokenizer, tmp_path):
    """`lm_eval --model local-completions` (token ids, loglikelihood and generate_until) against the server."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need its [api] extra
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_tokenizer))
    for text in (CONTEXT + CONTINUATION, "naïve café ✓ 日本語", "<|im_start|>user\nhi<|im_end|>"):
        assert tok(text, add_special_tokens=False)["input_ids"] == model.backend.encode(text)  # the same ids as the served model
    args = (f"base_url={server.url}/v1/completions,model={model.name},tokenizer={hf_tokenizer},"
            "tokenizer_backend=huggingface,tokenized_requests=True")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                          "--include_path", str(_task_dir(tmp_path)), "--tasks", "phikit_mc,phikit_gen",
                          "--output_path", str(tmp_path / "out"), "--log_samples"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    print(f"lm-eval took {time.perf_counter() - t0:.1f} s:", json.dumps(results))
    assert results["phikit_mc"]["acc,none"] == 1.0  # the model knows these three
    assert results["phikit_gen"]["exact_match,none"] == 1.0
    # lm-eval's numbers are the server's: each choice's loglikelihood is the sum of its continuation's scores
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_phikit_mc_*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == len(MC)
    for doc in samples:
        for args, resp in zip(doc["arguments"].values(), doc["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            scores = model.backend.prompt_logprobs(whole, 1)[len(ctx):]
            assert float(resp[0][0]) == pytest.approx(sum(x.logprob for x in scores), abs=1e-6)
            assert (resp[0][1] == "True") == all(x.top[0].id == x.id for x in scores)  # lm-eval's is_greedy
