"""Backends behind one protocol, and the one stream every local backend shares.

`Backend.stream(messages, params)` yields `Chunk`s; nothing else generates
text. Local backends (transformers, llama.cpp) only supply tokenisation and a
generator of token ids (`_generate`); the rendering through the chat format,
context checks, stop tokens and strings, incremental detokenisation and
timings live here, once. A remote backend (an OpenAI-compatible server)
overrides `stream_prompt`/`stream` as a whole.

Log-probabilities ride on the same stream: with `params.logprobs` a backend's
`_generate` yields `Logprob`s (the id, its log-probability and the likeliest
alternatives) instead of bare ids, and with `params.prompt_logprobs` the stream
first yields the prompt's, from `prompt_logprobs` (one extra evaluation of the
prompt, with logits at every place, made only when asked).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Callable, Iterator

from ..errors import ContextLengthError, PhikitError
from ..formats import ChatFormat, Message
from .types import Chunk, Logprob, Result, SamplingParams, Stats, join
from .scheduler import PENDING


class Backend(ABC):
    name: str = "?"
    model_name: str
    fmt: ChatFormat
    context_length: int
    # How many requests `generate_batch` runs together by default; 1 = this backend does not batch.
    max_batch: int = 1

    def render(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        return self.fmt.render(messages, add_generation_prompt=True, tools=tools)

    def stream(self, messages: list[Message], params: SamplingParams, tools: list[dict] | None = None) -> Iterator[Chunk]:
        """Stream the assistant's reply to `messages`. Raises ContextLengthError if the prompt does not fit."""
        return self.stream_prompt(self.render(messages, tools), params)

    @abstractmethod
    def stream_prompt(self, prompt: str | list[int], params: SamplingParams) -> Iterator[Chunk]:
        """Stream a continuation of already-rendered prompt text, or of token ids of this model's vocabulary
        (taken as given: no BOS is added)."""

    def check_prompt_ids(self, ids: list[int]) -> None:
        """Raise PhikitError if `ids` are not all token ids of this model (a remote server checks its own)."""

    def generate_batch(self, message_lists: list[list[Message]], params: SamplingParams) -> list[Result]:
        """Replies to several independent chats. Backends that can run them together override
        this; the results are those of `stream`, one by one (up to floating-point rounding)."""
        return [join(self.stream(m, params), self.model_name) for m in message_lists]

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def info(self) -> dict: ...


class LocalBackend(Backend):
    """A backend that runs the model in this process, token by token."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text, special tokens parsed, BOS as the model expects."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ids with special tokens left out."""

    @abstractmethod
    def token_id(self, token: str) -> int | None:
        """Id of one special token string, or None if the vocabulary lacks it."""

    @abstractmethod
    def _generate(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> Iterator[int | Logprob]:
        """Yield sampled token ids, at most `max_new`; closing the generator stops work.

        With `params.logprobs` set (only on a backend whose `logprobs_supported`), yield each as a
        `Logprob` instead (see `_logprob`), of the model's raw distribution at that step."""

    # Set by `enable_batching`: every generation then runs on its engine thread, batched with the others.
    scheduler = None

    def batch_model(self, parallel: int, kv_tokens: int | None):
        """This backend's BatchModel (engine/scheduler.py), or None where it runs one sequence at a time."""
        return None

    def enable_batching(self, parallel: int, kv_tokens: int | None = None, prompt_cache: bool = True) -> dict:
        """Run every generation of this backend through a Scheduler: up to `parallel` sequences step together
        (where the backend batches; else one at a time, still on one engine thread, so callers on several
        threads are safe), in a KV cache of `kv_tokens` (default: the backend's), with prompt caching.
        Returns the scheduler's stats (what a server prints at start)."""
        from .scheduler import Scheduler, SerialBatch

        self.close()  # an earlier scheduler and its batch (its cache, and on llama.cpp weights that may be reopened now)
        bm = self.batch_model(parallel, kv_tokens)
        if bm is None:
            bm, parallel = SerialBatch(self), 1
        self.scheduler = Scheduler(bm, parallel, prompt_cache, self.model_name)
        self.max_batch = parallel  # the instance's own, until `close` gives back the class's
        return self.scheduler.stats()

    def close(self) -> None:
        """Stop the engine thread, if any (unloading a model)."""
        if self.scheduler is not None:
            self.scheduler.close()
            close = getattr(self.scheduler.model, "close", None)
            self.scheduler = None
            self.__dict__.pop("max_batch", None)
            if close is not None:
                close()

    def generate_batch(self, message_lists: list[list[Message]], params: SamplingParams) -> list[Result]:
        """With a scheduler, every chat is a stream of its own, read on its own thread: they run together."""
        if self.scheduler is None or len(message_lists) < 2:
            return super().generate_batch(message_lists, params)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(message_lists), 2 * self.scheduler.parallel), thread_name_prefix="phikit-batch") as pool:
            return list(pool.map(lambda m: join(self.stream(m, params), self.model_name), message_lists))

    # Whether `_generate` honours params.logprobs and `prompt_logprobs` works.
    logprobs_supported: bool = False
    # Token ids run 0 .. vocab_size - 1; None: not known, ids are not checked.
    vocab_size: int | None = None

    def prompt_logprobs(self, ids: list[int], top: int) -> list[Logprob]:
        """Each token of `ids` with its log-probability given the ones before it (None for the first)
        and the `top` likeliest tokens at its place: the model's raw distribution, as for generated tokens."""
        raise PhikitError(f"the {self.name} backend cannot give log-probabilities")

    def token_piece(self, token: int) -> bytes:
        """The bytes of one token as the vocabulary holds it (special tokens as their text)."""
        return self.decode([token]).encode("utf-8")

    def _logprob(self, token: int, logprob: float | None, top: list[tuple[int, float]] = ()) -> Logprob:
        """The Logprob of `token`, with `top` as (id, logprob) pairs, most likely first."""
        return Logprob(token, self.token_piece(token), None if logprob is None else float(logprob),
                       [Logprob(i, self.token_piece(i), float(v)) for i, v in top])

    def check_prompt_ids(self, ids: list[int]) -> None:
        n = self.vocab_size
        if n is None:
            return
        for at, i in enumerate(ids):
            if not (type(i) is int and 0 <= i < n):
                raise PhikitError(f"token id {i!r} at position {at} is not in {self.model_name}'s vocabulary "
                                  f"(ids 0 to {n - 1}): send ids of this model's own tokenizer")

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def stop_ids(self) -> set[int]:
        ids = {self.token_id(s) for s in self.fmt.stop}
        return {i for i in ids if i is not None} | set(getattr(self, "extra_stop_ids", ()))

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {n_prompt} tokens but {self.model_name}'s context is {self.context_length} tokens: "
                "shorten the prompt or the history"
            )

    def prepare(self, params: SamplingParams) -> None:
        """Check (and build, where a backend can) what `params` asks for before its stream starts, so that a
        bad request fails before the first chunk: here the JSON schema's bounds (engine/constrain.py)."""
        if params.json_schema is not None:
            from .constrain import check_schema

            check_schema(params.json_schema)

    def stream_prompt(self, prompt: str | list[int], params: SamplingParams) -> Iterator[Chunk]:
        params.validate()
        if (params.logprobs is not None or params.prompt_logprobs is not None) and not self.logprobs_supported:
            raise PhikitError(f"the {self.name} backend cannot give log-probabilities: leave logprobs out")
        self.prepare(params)
        t0 = time.perf_counter()
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = list(prompt)
            if not ids:
                raise PhikitError("the prompt has no token ids: send at least one")
            self.check_prompt_ids(ids)
        self.check_fits(len(ids))
        stream = ChunkStream()
        stream.chunks = self._stream_ids(ids, params, t0, stream)
        return stream

    def _stream_ids(self, ids: list[int], params: SamplingParams, t0: float, stream: "ChunkStream") -> Iterator[Chunk]:
        max_new = min(params.max_tokens, self.context_length - len(ids))
        stops = set() if params.ignore_eos else self.stop_ids()
        detok = IncrementalDetokenizer(self.decode)
        guard = StopStrings(params.stop)
        stats = Stats(prompt_tokens=len(ids))
        finish, hit = "length", False
        t_first = t_last = None
        sch = self.scheduler
        if params.prompt_logprobs is not None:
            k = params.prompt_logprobs
            yield Chunk(prompt_logprobs=sch.call(self.prompt_logprobs, ids, k) if sch else self.prompt_logprobs(ids, k))
        if max_new <= 0:
            gen = _no_tokens()
        elif sch is not None:
            gen = stream.reader = sch.submit(ids, params, max_new, stops)
        else:
            gen = self._generate(ids, params, max_new)
        try:
            for tok in gen:
                if tok is PENDING:  # a watched reader's next token is not made yet (ChunkStream)
                    yield PENDING
                    continue
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
                lp = tok if isinstance(tok, Logprob) else None
                if lp is not None:
                    tok = lp.id
                if tok in stops:
                    finish = "stop"
                    break
                stats.completion_tokens += 1
                text, hit = guard.feed(detok.add(tok))
                yield Chunk(text=text, token_ids=[tok], logprobs=None if lp is None else [lp])
                if hit:
                    finish = "stop"
                    break
            else:
                if stats.completion_tokens < max_new:
                    finish = "stop"  # the backend ended on its own end-of-generation token
        finally:
            gen.close()
        tail = "" if hit else guard.flush()
        now = time.perf_counter()
        stats.ttft_s = (t_first or now) - t0
        stats.prompt_s = stats.ttft_s
        stats.decode_s = (t_last or now) - (t_first or now)
        stats.total_s = now - t0
        yield Chunk(text=tail, finish_reason=finish, stats=stats)


class ChunkStream:
    """The Chunks of `LocalBackend.stream_prompt`, and `reader`: the scheduler's TokenReader under them once the
    stream has started on a Scheduler (else None).

    Each of the reader's items gives one Chunk (its token's, or the final one at the end), and only reading an
    item can wait; so whoever `watch`es the reader (serve/worker.py) can pull Chunks on an event loop without
    ever blocking it: where the next token is not made yet the stream gives PENDING, and the engine's notify
    says when to pull again. Unwatched, it is a plain iterator of Chunks.
    """

    chunks: Iterator[Chunk]
    reader = None

    def __iter__(self) -> "ChunkStream":
        return self

    def __next__(self) -> Chunk:
        return next(self.chunks)

    def close(self) -> None:
        self.chunks.close()


def _no_tokens() -> Iterator[int]:
    """The generation of max_tokens 0 (a prompt only scored)."""
    yield from ()


class IncrementalDetokenizer:
    """Turns a stream of ids into text deltas without splitting characters or words.

    Decodes a small window (prefix offset .. end) and emits only the new part,
    holding back while the window ends in an incomplete UTF-8 sequence. This is
    the offset scheme of Hugging Face's text-generation-inference.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, tok: int) -> str:
        self.ids.append(tok)
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


class StopStrings:
    """Holds back text that might be the start of a stop string; reports a hit.

    Each stop string has a Knuth-Morris-Pratt matcher whose state is the length of the
    longest prefix of it that ends the text so far: every character costs amortised O(1)
    per stop string, so a stream's check is linear in its text and in the stop strings
    (testing every prefix on every token, as before, was quadratic in a stop's length).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._fail = [_prefix_function(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        start = len(self.pending)
        self.pending += delta
        for i, ch in enumerate(delta, start):
            hit = 0
            for j, s in enumerate(self.stops):
                k, fail = self._state[j], self._fail[j]
                if k == len(s):
                    k = fail[k - 1]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                self._state[j] = k
                if k == len(s):
                    hit = max(hit, k)
            if hit:  # stop strings end at i: the text before the longest of them is the last text
                out, self.pending = self.pending[: i + 1 - hit], ""
                return out, True
        hold = max(self._state)  # the longest tail of the text that may yet become a stop string
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _prefix_function(s: str) -> list[int]:
    """KMP's failure table: fail[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail
