"""Continuous batching: many requests' sequences decoded together, one model step at a time.

One engine thread owns the model. Requests `submit` a prompt (token ids) and read their tokens
from a queue; between two steps the thread admits waiting requests (FIFO, up to `parallel`),
drops the ones whose reader went away and finishes the ones that hit a stop id or their token
limit. A step evaluates, in one call of the backend's `BatchModel.forward`, one token of every
decoding sequence and a slice of each prompt still being prefilled (at most `step_tokens` in
all, decoding sequences first), so a long prompt is read in slices between the others' steps
and never stalls them for long. Each sequence samples with its own parameters, seed, JSON
constraint and log-probability request (the BatchModel's `start` builds them).

Everything above the token ids (detokenising, stop strings, timings) stays the shared stream's
(engine/backend.py): `LocalBackend._stream_ids` reads `submit`'s tokens exactly as it reads a
backend's own `_generate`, on the caller's thread.

The KV cache is fixed at start (`BatchModel.capacity`, in tokens). Before a step the scheduler
makes room for its tokens: first by dropping cached prefixes (least recently used), then by
preempting the sequence that started last: its cache is freed and it waits at the head of the
queue, to be prefilled again from its prompt and the tokens it had made (vLLM's recompute
preemption). A request longer than the whole cache is refused when submitted.

Prompt caching: a finished sequence's tokens stay in the cache (the BatchModel keeps them);
a new prompt that begins with them reuses that KV and prefills only the rest.

Why our own scheduler rather than a library's: the sequences run through phikit's own stream
and backends (llama.cpp's multi-sequence batches, transformers' caches) on the CPU and the GPU;
vLLM's scheduler is tied to its own engine, and transformers' continuous batching manager to
its paged CUDA attention.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Callable

from ..errors import BusyError, PhikitError
from .types import Logprob, SamplingParams

_END = object()
PENDING = object()  # what a TokenReader watched by an event loop gives where its next item is not made yet


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def best_prefix(want: list[int], cached, running, leave: int = 1) -> tuple[object, int, "Seq | None"]:
    """Where a new sequence's KV can start from: (key of the cached prefix to take over, or None; how many of
    `want`'s tokens it gives; the running Seq to share them with, or None). `cached`: (key, tokens) pairs of
    finished sequences' prefixes; `running`: Seqs whose read tokens may be shared. A cached prefix wins a tie
    (taking it over copies nothing); at least `leave` tokens of `want` are left to read (the last one's logits
    are the next sample's)."""
    best, n, share = None, 0, None
    for key, toks in cached:
        k = common_prefix(toks, want)
        if k > n:
            best, n = key, k
    for other in running:
        k = common_prefix(other.tokens[: other.n_kv], want)
        if k > n:
            best, n, share = None, k, other
    return best, max(0, min(n, len(want) - leave)), share


class Seq:
    """One request's sequence: its prompt, what it made, where it is in the cache."""

    _ids = itertools.count()

    def __init__(self, ids: list[int], params: SamplingParams, max_new: int, stops: set[int]):
        self.id = next(Seq._ids)
        self.prompt = ids
        self.params = params
        self.max_new = max_new
        self.stops = stops
        self.made: list[int] = []  # sampled tokens, in order
        self.n_kv = 0  # tokens of `tokens` held in the KV cache
        self.cached = 0  # of those, reused from the prompt cache at admission
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.notify: Callable[[], None] | None = None  # called after each item put in `out` (TokenReader.watch)
        self.gone = False  # the reader closed its iterator
        self.slot = None  # the BatchModel's place for it in the cache (freed on preemption)
        self.sampler = None  # the BatchModel's sampler (kept across a preemption: RNG and grammar state)
        self.t_submit = time.perf_counter()

    @property
    def tokens(self) -> list[int]:
        """What the model must have read before the next sample: the prompt and every made token."""
        return self.prompt + self.made

    def todo(self) -> int:
        return len(self.prompt) + len(self.made) - self.n_kv  # len(self.tokens) without building the list

    def put(self, item) -> None:
        """Hand `item` (a token, a Logprob, an error or the end) to the reader, and tell its watcher."""
        self.out.put(item)
        if self.notify is not None:
            self.notify()


class TokenReader:
    """The reader's end of a Seq (what `Scheduler.submit` returns): its items in order; closing it frees the place.

    By default `next` waits for the engine's next item. `watch(notify)` makes it never wait: it gives PENDING
    where the next item is not made yet, and the engine thread calls `notify()` after each item it hands over.
    An event loop then drives many streams on its own thread, woken once per batch of items (serve/worker.py),
    instead of a thread per stream each woken by its token.
    """

    def __init__(self, scheduler: "Scheduler", seq: Seq):
        self.scheduler, self.seq = scheduler, seq
        self.done = False
        self._wait = True

    def __iter__(self) -> "TokenReader":
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        if self._wait:
            item = self.seq.out.get()
        else:
            try:
                item = self.seq.out.get_nowait()
            except queue.Empty:
                return PENDING
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def watch(self, notify: Callable[[], None]) -> None:
        """From now on never wait (PENDING instead), and have the engine call `notify` after each item."""
        self._wait = False
        self.seq.notify = notify

    def close(self) -> None:
        self.done = True
        self.seq.notify = None
        sch, seq = self.scheduler, self.seq
        if not seq.gone:
            with sch.cv:
                seq.gone = True
                sch.cv.notify()

    def __del__(self) -> None:  # a reader dropped without close still frees its place
        if not self.done:
            self.close()


class BatchModel(ABC):
    """What a backend does for the scheduler; every call comes from the engine thread."""

    capacity: int  # KV cache size, in tokens, for every sequence and cached prefix together
    seq_limit: int | None = None  # the most tokens one sequence may hold, where less than `capacity`
    step_tokens: int = 512  # tokens one forward may take

    @abstractmethod
    def start(self, seq: Seq, reuse: bool) -> None:
        """Give `seq` a place in the cache (reusing a cached prefix when `reuse`: set seq.n_kv and seq.cached)
        and its sampler. Raise PhikitError if it cannot run (the request fails alone)."""

    @abstractmethod
    def forward(self, work: list[tuple[Seq, list[int]]]) -> dict[int, object]:
        """Evaluate each sequence's tokens (its next ones, at positions seq.n_kv...) in one batch; return, by
        seq.id, the output to sample from for each sequence whose tokens reach its end (seq.todo() == len)."""

    @abstractmethod
    def sample(self, seq: Seq, out: object) -> int | Logprob:
        """The next token of `seq` from its output of the last forward (a Logprob if seq.params.logprobs)."""

    @abstractmethod
    def finish(self, seq: Seq, keep: bool) -> None:
        """Take `seq` out of the batch; with `keep`, its tokens stay in the cache as a prefix for later prompts."""

    @abstractmethod
    def cached_tokens(self) -> int:
        """Tokens held by cached prefixes (not by running sequences)."""

    @abstractmethod
    def evict_one(self) -> bool:
        """Drop the least recently used cached prefix; False if there is none."""


class SerialBatch(BatchModel):
    """A backend that cannot batch, behind the same scheduler: its own `_generate`, one sequence at a time
    (the scheduler runs it with parallel 1), on the engine thread like every other model call."""

    capacity = step_tokens = 1 << 62

    def __init__(self, backend):
        self.be = backend

    def start(self, seq: Seq, reuse: bool) -> None:
        seq.slot = self.be._generate(seq.prompt, seq.params, seq.max_new)

    def forward(self, work):
        return {s.id: next(s.slot, None) for s, _ in work}  # one token each; None: the backend ended the sequence

    def sample(self, seq: Seq, out):
        return out

    def finish(self, seq: Seq, keep: bool) -> None:
        if seq.slot is not None:
            seq.slot.close()
            seq.slot = None

    def cached_tokens(self) -> int:
        return 0

    def evict_one(self) -> bool:
        return False


class Scheduler:
    """Runs a BatchModel on its own thread for every request of one loaded model."""

    def __init__(self, model: BatchModel, parallel: int, prompt_cache: bool = True, name: str = "model"):
        if parallel < 1:
            raise PhikitError(f"parallel must be at least 1, got {parallel}")
        self.model = model
        self.parallel = parallel
        self.prompt_cache = prompt_cache
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self.calls: list[tuple[Callable, Future]] = []
        self.cv = threading.Condition()
        self.closed = False
        # Counters for /metrics.
        self.steps = 0
        self.last_batch = 0
        self.cache_hit_tokens = 0
        self.prompt_tokens = 0
        self.preemptions = 0
        self.thread = threading.Thread(target=self._loop, name=f"phikit-engine-{name}", daemon=True)
        self.thread.start()

    # -- what callers do (any thread) ----------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, max_new: int, stops: set[int]) -> TokenReader:
        """Tokens of a continuation of `ids`, as the engine thread makes them; closing the reader frees the place."""
        limit = self.model.seq_limit or self.model.capacity
        if len(ids) + max_new > limit:
            raise PhikitError(f"the request needs {len(ids) + max_new} tokens of KV cache but this server holds {limit} for one "
                              "request: shorten the prompt or max_tokens, or start the server with a larger --kv-tokens"
                              + (" or a lower --parallel" if limit < self.model.capacity else ""))
        seq = Seq(ids, params, max_new, stops)
        with self.cv:
            if self.closed:
                raise PhikitError("the model was unloaded: send the request again")
            self.waiting.append(seq)
            self.cv.notify()
        return TokenReader(self, seq)

    def call(self, fn: Callable, *args):
        """Run `fn(*args)` on the engine thread between two steps (anything else that uses the model) and return its result."""
        if threading.current_thread() is self.thread:
            return fn(*args)
        fut: Future = Future()
        with self.cv:
            if self.closed:
                raise PhikitError("the model was unloaded: send the request again")
            self.calls.append((lambda: fn(*args), fut))
            self.cv.notify()
        return fut.result()

    def close(self) -> None:
        """Stop the thread: waiting and running requests end with an error."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)

    def room(self, n: int) -> None:
        """Free `n` cells of the KV cache for work outside the sequences (engine thread): cached prefixes go first."""
        while self._held() + n > self.model.capacity:
            if not self.model.evict_one():
                raise BusyError("the KV cache is full with running requests: send this request again shortly")

    def _held(self) -> int:
        """KV cells held now: by the running sequences and by cached prefixes."""
        return sum(s.n_kv for s in self.running) + self.model.cached_tokens()

    def stats(self) -> dict:
        m = self.model
        in_use = sum(s.n_kv for s in self.running)
        return {"parallel": self.parallel, "running": len(self.running), "waiting": len(self.waiting),
                "batch_size": self.last_batch, "kv_capacity_tokens": m.capacity, "kv_used_tokens": in_use,
                "kv_cached_tokens": m.cached_tokens(), "prompt_tokens": self.prompt_tokens,
                "cache_hit_tokens": self.cache_hit_tokens, "preemptions": self.preemptions, "steps": self.steps}

    # -- the engine thread ------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self.closed or self.calls or self.running or self.waiting):
                    self.cv.wait()
                if self.closed:
                    break
                calls, self.calls = self.calls, []
                gone = [s for s in self.running if s.gone]
                for s in [s for s in self.waiting if s.gone]:
                    self.waiting.remove(s)
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except BaseException as e:  # the caller gets it
                    fut.set_exception(e)
            for s in gone:
                self._end(s, None, keep=True)
            self._admit()
            if self.running:
                try:
                    self._step()
                except Exception as e:  # a failed forward fails the requests in it, never the thread
                    for s in list(self.running):
                        self._end(s, e if isinstance(e, PhikitError) else PhikitError(f"generation failed: {e}"), keep=False)
        for s in self.running + self.waiting:
            s.put(PhikitError("the model was unloaded while this request ran: send it again"))
        for fn, fut in self.calls:
            fut.set_exception(PhikitError("the model was unloaded: send the request again"))

    def _admit(self) -> None:
        while len(self.running) < self.parallel:
            with self.cv:
                if not self.waiting:
                    return
                seq = self.waiting.pop(0)
            try:
                self.model.start(seq, reuse=self.prompt_cache)
            except Exception as e:  # a request that cannot start fails alone
                seq.put(e if isinstance(e, PhikitError) else PhikitError(str(e)))
                continue
            if not seq.made:  # not a preempted sequence coming back
                self.prompt_tokens += len(seq.prompt)
                self.cache_hit_tokens += seq.cached
            self.running.append(seq)

    def _plan(self) -> list[tuple[Seq, list[int]]]:
        """This step's work: one token of every decoding sequence, then prompt slices in arrival order."""
        budget = self.model.step_tokens
        decode = [s for s in self.running if s.todo() == 1]
        work = [(s, (s.made or s.prompt)[-1:]) for s in decode]
        budget -= len(work)
        for s in self.running:
            if s.todo() > 1 and budget > 0:
                take = min(s.todo(), budget)
                work.append((s, s.tokens[s.n_kv : s.n_kv + take]))
                budget -= take
        return work

    def _make_room(self, work: list[tuple[Seq, list[int]]]) -> list[tuple[Seq, list[int]]]:
        """Drop cached prefixes, then preempt the latest sequences, until the step's tokens fit."""
        while self._held() + sum(len(t) for _, t in work) > self.model.capacity:
            if self.model.evict_one():
                continue
            victim = self.running[-1]
            if len(self.running) == 1:  # cannot happen: submit refuses what one sequence alone cannot hold
                raise PhikitError("the KV cache cannot hold this request")
            self.running.remove(victim)
            self.model.finish(victim, keep=False)
            victim.n_kv = victim.cached = 0
            self.preemptions += 1
            with self.cv:
                self.waiting.insert(0, victim)
            work = [(s, t) for s, t in work if s is not victim]
        return work

    def _step(self) -> None:
        work = self._make_room(self._plan())
        if not work:
            return
        outs = self.model.forward(work)
        self.steps += 1
        self.last_batch = len(work)
        for s, toks in work:
            s.n_kv += len(toks)
            if s.id not in outs:
                continue
            item = self.model.sample(s, outs[s.id])
            if item is None:
                self._end(s, None, keep=False)
                continue
            tok = item.id if isinstance(item, Logprob) else item
            s.made.append(tok)
            if not s.gone:
                s.put(item)
            if tok in s.stops or len(s.made) >= s.max_new:
                self._end(s, None, keep=True)

    def _end(self, seq: Seq, error: BaseException | None, keep: bool) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.model.finish(seq, keep=keep and self.prompt_cache and error is None)
        seq.put(error if error is not None else _END)
