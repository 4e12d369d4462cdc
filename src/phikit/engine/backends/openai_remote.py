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
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterator

from ...errors import ContextLengthError, PhikitError, require
from ...formats import ChatFormat, Message
from ..backend import Backend
from ..types import Chunk, Result, SamplingParams, Stats, join

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
        return self._events("/chat/completions", body, lambda ch: (ch.get("delta") or {}).get("content") or "")

    def stream_prompt(self, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
        body = {**self._body(params), "prompt": prompt}
        return self._events("/completions", body, lambda ch: ch.get("text") or "")

    def _events(self, path: str, body: dict, text_of) -> Iterator[Chunk]:
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
        return self._chunks(resp, text_of, t0)

    def _chunks(self, resp, text_of, t0: float) -> Iterator[Chunk]:
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
                    if text:
                        t_last = time.perf_counter()
                        t_first = t_first or t_last
                        pieces += 1
                        yield Chunk(text=text)
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
