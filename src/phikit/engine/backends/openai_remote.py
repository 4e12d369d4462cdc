"""A backend that generates on a remote OpenAI-compatible server: vLLM, Ollama, another phikit.

    m = phikit.load("my-model", backend="openai", base_url="http://gpu-box:8000/v1")

The server renders the chat template and samples, so this backend overrides
`stream` / `stream_prompt` as a whole: it posts to /v1/chat/completions (or
/v1/completions for rendered text) with `stream: true` and turns the
server-sent events into the same `Chunk`s, the last one with finish_reason and
Stats (token counts from the server's usage, timings measured here).
Closing the stream closes the HTTP response, which stops a server that
notices disconnects (phikit and vLLM do). Tools are declared in the system
prompt the phikit way (JSON list) so `phikit.chat.run_tools` parses the reply
as it does locally; JSON output uses `response_format` json_schema.
Log-probabilities are asked of the server (`logprobs`/`top_logprobs` on chat,
`logprobs` on completions; the prompt's through one `echo` request) and passed
on as the server gave them (by token text: `Logprob.id` is None); a server that
answers without them is a 400 naming this backend, never a silent null.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

from ...errors import ContextLengthError, PhikitError, require
from ...formats import ChatFormat, Message
from ..backend import Backend
from ..types import Chunk, Logprob, Result, SamplingParams, Stats, join

DEFAULT_CONTEXT = 4096  # used when the server does not say (vLLM reports max_model_len; Ollama and OpenAI do not)


class RemoteFormat(ChatFormat):
    """The remote server applies its own chat template; this only normalises messages and declares tools."""

    def turn(self, role: str, content: str) -> str:
        raise PhikitError("a remote model's chat template lives on its server: send messages, not rendered text")

    def generation_prompt(self) -> str:
        raise PhikitError("a remote model's chat template lives on its server: send messages, not rendered text")


REMOTE_FORMAT = RemoteFormat(name="remote", stop=(), specials=())


class OpenAIRemoteBackend(Backend):
    name = "openai"
    max_batch = 8  # concurrent requests in generate_batch

    def __init__(self, base_url: str, model_name: str, api_key: str | None = None, context_length: int = DEFAULT_CONTEXT,
                 timeout: float = 600.0):
        httpx = require("httpx", why="the openai backend talks HTTP")
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.context_length = context_length
        self.fmt = REMOTE_FORMAT
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))

    @classmethod
    def connect(cls, base_url: str, model: str | None = None, api_key: str | None = None, n_ctx: int | None = None) -> "OpenAIRemoteBackend":
        """Check the server answers GET /models and serves `model` (default: its first model)."""
        if not base_url:
            raise PhikitError("the openai backend needs --base-url, e.g. http://127.0.0.1:8000/v1")
        base = base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"  # the OpenAI routes live under /v1 on vLLM, Ollama and phikit alike
        be = cls(base, model or "", api_key if api_key is not None else os.environ.get("OPENAI_API_KEY"))
        cards = be._get("/models").get("data", [])
        ids = [c.get("id") for c in cards]
        if not model:
            if not ids:
                raise PhikitError(f"{base} serves no models")
            model = ids[0]
        elif model not in ids and f"{model}:latest" not in ids:
            raise PhikitError(f"{base} does not serve {model!r}; it serves: {', '.join(map(str, ids))}")
        be.model_name = model
        card = next((c for c in cards if c.get("id") == model), {})
        be.context_length = n_ctx or int(card.get("max_model_len") or DEFAULT_CONTEXT)
        return be

    # -- HTTP --------------------------------------------------------------
    def _fail(self, r) -> None:
        try:
            err = r.json().get("error")
            msg = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            msg = r.text[:300]
        msg = f"the server at {self.base_url} answered {r.status_code}: {msg}"
        if r.status_code == 400 and "context" in str(msg).lower():
            raise ContextLengthError(msg)
        e = PhikitError(msg)
        e.status = r.status_code if 400 <= r.status_code < 500 else 502
        raise e

    def _get(self, path: str) -> dict:
        import httpx

        try:
            r = self.client.get(path)
        except httpx.HTTPError as e:
            raise PhikitError(f"cannot reach {self.base_url}{path} ({e}): start the server or fix --base-url") from None
        if r.status_code >= 400:
            self._fail(r)
        return r.json()

    def _body(self, params: SamplingParams) -> dict:
        params.validate()
        body = {"model": self.model_name, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p}
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM's extension; other servers ignore it
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def generate_batch(self, message_lists: list[list[Message]], params: SamplingParams) -> list[Result]:
        """Concurrent requests: the server (vLLM, another phikit, Ollama) batches them as it can."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(len(message_lists), self.max_batch))) as pool:
            return list(pool.map(lambda m: join(self.stream(m, params), self.model_name), message_lists))

    # -- the stream ----------------------------------------------------------
    def stream(self, messages: list[Message], params: SamplingParams, tools: list[dict] | None = None) -> Iterator[Chunk]:
        msgs = self.fmt.normalise(messages)
        if tools:
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": self.fmt.system_with_tools(msgs[0]["content"], tools)}
            else:
                msgs.insert(0, {"role": "system", "content": self.fmt.system_with_tools("", tools)})
        body = {**self._body(params), "messages": msgs}
        if params.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": params.json_schema}}
        if params.prompt_logprobs is not None:
            raise PhikitError(f"the {self.name} backend gives the prompt's log-probabilities on completions only "
                              "(OpenAI's chat route has no echo)")
        if params.logprobs is not None:
            body.update(logprobs=True, top_logprobs=params.logprobs)
        return self._events("/chat/completions", body, lambda ch: (ch.get("delta") or {}).get("content") or "",
                            chat_logprobs if params.logprobs is not None else None)

    def stream_prompt(self, prompt: str | list[int], params: SamplingParams) -> Iterator[Chunk]:
        """`prompt` as text, or token ids of the server's model (passed on as they are)."""
        body = {**self._body(params), "prompt": prompt}
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        first = []
        if params.prompt_logprobs is not None:
            first = [Chunk(prompt_logprobs=self._prompt_logprobs(prompt, params.prompt_logprobs))]
            if params.max_tokens == 0:
                return iter([*first, Chunk(finish_reason="length", stats=Stats(prompt_tokens=len(first[0].prompt_logprobs)))])
        rest = self._events("/completions", body, lambda ch: ch.get("text") or "",
                            completion_logprobs if params.logprobs is not None else None)
        return _chain(first, rest)

    def _prompt_logprobs(self, prompt: str | list[int], top: int) -> list[Logprob]:
        """The prompt's tokens with their log-probabilities, from one blocking `echo` request (one token
        generated, for servers that refuse max_tokens 0; usage.prompt_tokens says where the prompt ends)."""
        import httpx

        body = {"model": self.model_name, "prompt": prompt, "echo": True, "logprobs": top, "max_tokens": 1, "temperature": 0}
        try:
            r = self.client.post("/completions", json=body)
        except httpx.HTTPError as e:
            raise PhikitError(f"cannot reach {self.base_url}/completions ({e}): start the server or fix --base-url") from None
        if r.status_code >= 400:
            self._fail(r)
        out = r.json()
        n = (out.get("usage") or {}).get("prompt_tokens")
        lps = completion_logprobs((out.get("choices") or [{}])[0])
        if lps is None or not n or len(lps) < n:
            raise self._no_logprobs()
        return lps[:n]

    def _no_logprobs(self) -> PhikitError:
        return PhikitError(f"the {self.name} backend: the server at {self.base_url} answered without log-probabilities "
                           f"for {self.model_name!r}; it does not give them (vLLM and phikit serve do): leave logprobs out")

    def _events(self, path: str, body: dict, text_of, logprobs_of=None) -> Iterator[Chunk]:
        import httpx

        t0 = time.perf_counter()
        try:
            resp = self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            raise PhikitError(f"cannot reach {self.base_url}{path} ({e}): start the server or fix --base-url") from None
        if resp.status_code >= 400:  # raised now, before the caller iterates, like a local context error
            resp.read()
            resp.close()
            self._fail(resp)
        return self._chunks(resp, text_of, t0, logprobs_of)

    def _chunks(self, resp, text_of, t0: float, logprobs_of=None) -> Iterator[Chunk]:
        stats, finish = Stats(), "stop"
        t_first = t_last = None
        pieces = 0
        try:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    err = event["error"]
                    raise PhikitError(f"the server failed mid-stream: {err.get('message') if isinstance(err, dict) else err}")
                if event.get("usage"):
                    stats.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    stats.completion_tokens = event["usage"].get("completion_tokens", 0)
                for ch in event.get("choices") or []:
                    text = text_of(ch)
                    lps = logprobs_of(ch) if logprobs_of is not None else None
                    if text and logprobs_of is not None and lps is None:
                        raise self._no_logprobs()
                    if text or lps:
                        t_last = time.perf_counter()
                        t_first = t_first or t_last
                        pieces += 1
                        yield Chunk(text=text, logprobs=lps)
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
        finally:
            resp.close()
        now = time.perf_counter()
        if not stats.completion_tokens:
            stats.completion_tokens = pieces  # a server without usage: one event is about one token
        stats.ttft_s = stats.prompt_s = (t_first or now) - t0
        stats.decode_s = (t_last or now) - (t_first or now)
        stats.total_s = now - t0
        yield Chunk(finish_reason=finish, stats=stats)

    def count_tokens(self, text: str) -> int:
        # The OpenAI API has no tokenizer route; ~4 characters a token is the usual estimate for English.
        return max(1, len(text) // 4)

    def info(self) -> dict:
        return {"backend": self.name, "device": "remote", "base_url": self.base_url, "remote_model": self.model_name,
                "context_length": self.context_length}


def _chain(first: list[Chunk], rest: Iterator[Chunk]) -> Iterator[Chunk]:
    try:
        yield from first
        yield from rest
    finally:
        rest.close()


def _piece(entry: dict) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if isinstance(raw, list) else str(entry.get("token", "")).encode("utf-8")


def chat_logprobs(choice: dict) -> list[Logprob] | None:
    """The Logprobs of a chat choice or delta (`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`)."""
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        return None
    return [Logprob(None, _piece(e), float(e["logprob"]),
                    [Logprob(None, _piece(t), float(t["logprob"])) for t in e.get("top_logprobs") or []])
            for e in content]


def completion_logprobs(choice: dict) -> list[Logprob] | None:
    """The Logprobs of a completions choice (`{"tokens", "token_logprobs", "top_logprobs", ...}`); the
    log-probability is None where the server gives none (an echoed prompt's first token)."""
    lp = choice.get("logprobs")
    if not lp or lp.get("tokens") is None:
        return None
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    out = []
    for tok, v, top in zip(lp["tokens"], lp.get("token_logprobs") or [], tops):
        alts = sorted((top or {}).items(), key=lambda kv: -kv[1])
        out.append(Logprob(None, str(tok).encode("utf-8"), None if v is None else float(v),
                           [Logprob(None, t.encode("utf-8"), float(x)) for t, x in alts]))
    return out
