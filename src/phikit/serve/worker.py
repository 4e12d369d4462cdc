"""The generation slots of a server: requests queue FIFO for one of `slots` places.

With one slot (`--parallel 1`) every call into the model (rendering, tokenising,
each step of a stream, closing a stream) runs on one dedicated thread: the model
is not thread-safe. A stream runs on that thread from its first chunk to its close
(`Lease.chunks`), posting each chunk to the event loop; the request stops it
between two tokens by setting a flag, and the thread closes the Chunk generator,
which is all it takes. The executor is FIFO, so the close of one stream runs
before the first step of the next one.

With several slots the models run on their own engine threads (engine/scheduler.py,
which batches the sequences of every request in a slot). A stream over that engine
(one with a `reader`) is pulled on the event loop itself, which the engine wakes
after each step (`Lease.chunks`); any other stream (tool calls, a backend that does
not batch) gets a thread of its own here. A stream's steps and its close are kept in
order by a lock of its Lease.

A request first waits for a slot (an asyncio.Semaphore, FIFO), holds it while its
stream runs, and gives it back when the stream ends, fails or its client goes away.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

from ..engine.scheduler import PENDING
from ..engine.types import Chunk

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while its request waited for the slot."""


_NOTHING = object()  # no chunk came before the next check of the client
_PULL = object()  # a watched stream has chunks ready: pull them (Lease.chunks)


class _Failed:
    """An error raised by a stream on its generation thread, on its way to the request."""

    def __init__(self, error: BaseException):
        self.error = error


class _Wakeups:
    """Chunks from the generation threads to the event loop, with one wake-up of the loop for all that wait.

    `call_soon_threadsafe` writes to the loop's self-pipe on every call: at 64 streams of a batch that was
    a system call a token and a tenth of the server's time (benchmarks/speed/serve_ceiling.py). Here a
    thread appends to a list and wakes the loop only when the list was empty; the loop hands out all
    that is queued, in the order posted.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []

    def post(self, items: asyncio.Queue, item) -> None:
        """Queue `item` for `items`; RuntimeError once the loop is closed (the server is going down)."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._pending.append((items, item))
            if len(self._pending) > 1:
                return  # a wake-up is on its way
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for items, item in batch:
            items.put_nowait(item)


def _post(wakeups: _Wakeups, items: asyncio.Queue, item) -> bool:
    """`wakeups.post(items, item)` from a thread; False once the event loop is closed (the server is going down)."""
    try:
        wakeups.post(items, item)
        return True
    except RuntimeError:
        return False


class Worker:
    """A FIFO queue in front of `slots` generation places."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self._sem = asyncio.Semaphore(slots)
        # One slot: the one thread every model call runs on. Several: a thread per slot, per close in flight, and for the rest.
        self._pool = ThreadPoolExecutor(1 if slots == 1 else 2 * slots + 1, thread_name_prefix="phikit-gen")
        self.waiting = 0  # requests queued for a slot (the /metrics queue length)
        self.active = 0  # requests holding a slot
        self._wakeups: _Wakeups | None = None

    def wakeups(self, loop: asyncio.AbstractEventLoop) -> _Wakeups:
        """The streams' way to `loop` (one for all of this worker's streams)."""
        if self._wakeups is None or self._wakeups.loop is not loop:
            self._wakeups = _Wakeups(loop)
        return self._wakeups

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run a blocking model call on the generation thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def acquire(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> "Lease":
        """Wait for the slot and return its Lease; raise ClientGone if `is_disconnected()` turns true meanwhile."""
        self.waiting += 1
        got = asyncio.ensure_future(self._sem.acquire())
        try:
            while not got.done():
                await asyncio.wait({got}, timeout=0.25)
                if not got.done() and is_disconnected is not None and await is_disconnected():
                    raise ClientGone()
        except BaseException:
            got.cancel()
            if got.done() and not got.cancelled() and got.exception() is None:
                self._sem.release()  # granted just as we gave up: hand it straight on
            raise
        finally:
            self.waiting -= 1
        self.active += 1
        return Lease(self, is_disconnected)

    def _release(self) -> None:
        self.active -= 1
        self._sem.release()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Lease:
    """One request's hold on the slot: start streams, pull their chunks, then `close()` (idempotent).

    `close()` is plain (not async) so a response can call it from any `finally`,
    even one being cancelled; it queues the close of the current stream on the
    generation thread and hands the slot to the next request.
    """

    def __init__(self, worker: Worker, is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.worker = worker
        self.is_disconnected = is_disconnected
        self._gen: Iterator[Chunk] | None = None
        self._open = True
        self._steps = threading.Lock()  # a stream's next and its close never overlap (several threads)

    async def start(self, make: Callable[[], Iterator[Chunk]]) -> Iterator[Chunk]:
        """Create a stream on the generation thread; errors (an over-long prompt...) raise here."""
        self._gen = await self.worker.call(make)
        return self._gen

    async def chunks(self, gen: Iterator[Chunk], watch: bool = False) -> AsyncIterator[Chunk]:
        """Yield `gen`'s chunks here; always closes it.

        A stream over the batching engine (one with a `reader`: engine/scheduler.py TokenReader, under
        engine/backend.py ChunkStream) is pulled here on the event loop, never waiting in it: once watched it
        gives PENDING where its next token is not made yet, and the engine thread's notify after each token it
        hands over queues a wake-up (`_PULL`) for the pull that follows. Any other stream runs on a generation
        thread to its end (or until this iterator stops), which posts each chunk here. Either way the loop is
        woken once for all that is queued (`_Wakeups`). Why not a thread for every stream: at 64 streams of a
        batch, 64 threads woken each step, each taking the interpreter lock in turn to detokenise one token, cost
        99-107 us of server CPU a token against 77-87 for the pulls here (benchmarks/speed/serve_ceiling.py). (Asking the
        pool for each chunk in turn, before that, cost a work item, a thread wake-up and two futures a token.) A
        stream is never read ahead of its model.

        watch: check every 0.25 s that the client is still there and raise ClientGone
        if not. For blocking (non-streaming) replies only: a streaming response
        already learns of a disconnect from the server, and two readers of one
        connection would steal each other's messages.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        wakeups = self.worker.wakeups(loop)
        stop = threading.Event()
        reader = getattr(gen, "reader", None) if self.worker.slots > 1 else None
        if reader is not None:
            reader.watch(lambda: _post(wakeups, items, _PULL))  # called on the engine thread
            items.put_nowait(_PULL)
        else:
            loop.run_in_executor(self.worker._pool, self._pump, gen, wakeups, items, stop)
        watch = watch and self.is_disconnected is not None
        next_check = loop.time() + 0.25
        try:
            while True:
                if watch:
                    try:
                        item = await asyncio.wait_for(items.get(), max(0.0, next_check - loop.time()))
                    except asyncio.TimeoutError:
                        item = _NOTHING
                    if loop.time() >= next_check:
                        next_check = loop.time() + 0.25
                        if await self.is_disconnected():
                            raise ClientGone()
                    if item is _NOTHING:
                        continue
                else:
                    item = await items.get()
                if item is _PULL:
                    for c in self._pull(gen):
                        if c is None:
                            return
                        yield c
                    continue
                if item is None:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            if reader is not None:
                self._close_now(gen)

    def _pull(self, gen: Iterator[Chunk]) -> Iterator[Chunk | None]:
        """The chunks a watched stream has ready, read here without waiting (up to its PENDING); None at its end."""
        while True:
            with self._steps:  # never beside a close on the pool (Lease.close)
                c = next(gen, None)
            if c is PENDING:
                return
            yield c
            if c is None:
                return

    def _pump(self, gen: Iterator[Chunk], wakeups: _Wakeups, items: asyncio.Queue, stop: threading.Event) -> None:
        """On a generation thread: `gen`'s chunks into `items` (then None, or the error), until its end or `stop`;
        closes `gen` before it returns, so with one slot the next request starts after this close."""
        def post(item) -> None:
            if not _post(wakeups, items, item):
                stop.set()

        try:
            while not stop.is_set():
                with self._steps:
                    chunk = next(gen, None)
                post(chunk)
                if chunk is None:
                    break
        except BaseException as e:  # the request fails with it (raised by chunks)
            post(_Failed(e))
        finally:
            self._close_now(gen)

    def _close_now(self, gen: Iterator[Chunk]) -> None:
        """Close `gen` (on a generation thread), after any step of it still running, so it never overlaps one."""
        close = getattr(gen, "close", None)
        if close is not None:
            with self._steps:
                close()

    def _close_gen(self, gen: Iterator[Chunk]) -> None:
        # On the pool, not awaited, so a cancelled request cannot skip it.
        asyncio.get_running_loop().run_in_executor(self.worker._pool, self._close_now, gen)

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        if self._gen is not None:
            self._close_gen(self._gen)
        self.worker._release()
