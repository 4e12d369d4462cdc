"""The models a server holds loaded: loaded on first use, unloaded after their keep-alive, within a budget.

One `Slot` per loaded model, keyed by what was loaded (weights, adapter, context length), so several
names over the same weights share one. A request `acquire`s the slot of its model (loading it if
need be) and `release`s it when its response has ended; the slot counts its uses, and a slot in use
is never unloaded. When the last use ends the model's keep-alive starts: Ollama's, per request ("5m",
a number of seconds, 0 = unload now, negative = forever). Loading a model that would pass
`max_loaded` models or `max_memory` bytes first unloads the least recently used idle ones; while the
others are all busy it waits for one to finish.

Loading runs on its own thread, never on the event loop, and never on the generation thread, so
other models keep generating meanwhile. Unloading runs on the generation thread (Worker.call):
that thread is FIFO, so the close of the last stream of a model runs before the model is freed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Hashable

from ..errors import DataError
from .worker import ClientGone, Worker

log = logging.getLogger("phikit.serve")
FOREVER = None  # a keep-alive that never ends
DEFAULT_KEEP_ALIVE = 300.0  # Ollama's 5 minutes
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_keep_alive(value, what: str = "keep_alive") -> float | None:
    """Seconds a model stays loaded after its last request, or FOREVER (None).

    Ollama's forms: a Go duration ("5m", "1h30m", "90s", "300ms"), a number of seconds (also as
    text, as $OLLAMA_KEEP_ALIVE takes it), 0 to unload at once, anything negative for forever."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{what} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise DataError(f"{what} must be a duration such as \"5m\", \"1h30m\" or \"90s\", a number of seconds, "
                                f"0 (unload at once) or negative (keep loaded forever); got {value!r}") from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    if math.isnan(seconds):
        raise DataError(f"{what} must be a duration, got {value!r}")
    return FOREVER if seconds < 0 or math.isinf(seconds) else seconds


def free(box: list) -> None:
    """Let go of the model in `box` now (on the generation thread): its backend's close(), then a collection.

    In a box so that no caller's frame still holds the model while it is collected."""
    model = box.pop()
    close = getattr(model.backend, "close", None)
    if callable(close):
        close()
    del model
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Slot:
    """One loaded (or loading) model."""

    def __init__(self, key: Hashable, name: str, size: int, keep_alive: float | None, pinned: bool = False):
        self.key, self.name, self.size, self.keep_alive, self.pinned = key, name, size, keep_alive, pinned
        self.model = None  # set once loaded
        self.info: dict = {}
        self.uses = 0
        self.last_used = time.monotonic()
        self.expires_at: float | None = None  # wall-clock time of the unload; None: not counting down
        self.ready: asyncio.Task | None = None  # the load, while it runs
        self.waiting_for_room = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.expires_at = None


class Pool:
    def __init__(self, worker: Worker, max_loaded: int = 3, max_memory: int | None = None):
        self.worker, self.max_loaded, self.max_memory = worker, max_loaded, max_memory
        self.slots: dict[Hashable, Slot] = {}
        self.loads = self.unloads = 0  # for /metrics
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="phikit-load")
        self._changed: asyncio.Event | None = None

    # -- what is loaded -----------------------------------------------------
    def add(self, key: Hashable, name: str, model, keep_alive: float | None, pinned: bool = False) -> Slot:
        """Hold `model`, loaded already (the model the server was started with)."""
        slot = Slot(key, name, 0, keep_alive, pinned)
        self._loaded(slot, model, model.info())
        self.slots[key] = slot
        return slot

    def loaded(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.loaded]

    def slot(self, key: Hashable) -> Slot | None:
        s = self.slots.get(key)
        return s if s is not None and s.loaded else None

    # -- use --------------------------------------------------------------------
    async def acquire(self, key: Hashable, name: str, load: Callable[[], object], keep_alive: float | None, estimate: int = 0,
                      is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> Slot:
        """The slot of `key`, loaded (by `load()` on the loading thread when it is not), with one more use.

        The caller must `release` it. Raises what `load` raises, or ClientGone when the client leaves meanwhile."""
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, name, estimate, keep_alive)
            slot.ready = asyncio.ensure_future(self._load(slot, load))
            slot.ready.add_done_callback(lambda t: t.cancelled() or t.exception())  # read here, whoever waits
        slot.uses += 1
        slot._stop_timer()
        slot.name, slot.keep_alive, slot.last_used = name, keep_alive, time.monotonic()
        if slot.loaded:
            return slot
        try:
            while not slot.ready.done():
                await asyncio.wait({slot.ready}, timeout=0.25)
                if not slot.ready.done() and is_disconnected is not None and await is_disconnected():
                    raise ClientGone()
            slot.ready.result()  # the load's error, if it failed
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: Slot) -> None:
        """One use of `slot` ended; with none left its keep-alive starts (or, loading, its wait for room stops)."""
        slot.uses -= 1
        slot.last_used = time.monotonic()
        if slot.uses > 0:
            return
        if not slot.loaded:
            if slot.waiting_for_room and slot.ready is not None:
                slot.ready.cancel()  # everyone who wanted it left before it could load
            return
        self._notify()
        if slot.pinned or slot.keep_alive is FOREVER:
            return
        loop = asyncio.get_running_loop()
        slot.expires_at = time.time() + slot.keep_alive
        slot._timer = loop.call_later(slot.keep_alive, lambda: asyncio.ensure_future(self._expire(slot)))

    async def unload(self, key: Hashable) -> bool:
        """Unload `key`'s model now if idle, else as soon as its last request ends (keep_alive 0). False if not loaded."""
        slot = self.slots.get(key)
        if slot is None:
            return False
        slot.keep_alive = 0.0
        if slot.loaded and slot.uses == 0 and not slot.pinned:
            await self._unload(slot)
        return True

    # -- inside -------------------------------------------------------------------
    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    def _loaded(self, slot: Slot, model, info: dict) -> None:
        slot.model, slot.info = model, info
        slot.size = int(info.get("memory_bytes") or slot.size or 0)

    async def _load(self, slot: Slot, load: Callable[[], object]) -> None:
        try:
            await self._make_room(slot)
            model, info = await asyncio.get_running_loop().run_in_executor(self._loader, _load_and_describe, load)
        except BaseException:
            if self.slots.get(slot.key) is slot:
                del self.slots[slot.key]
            self._notify()
            raise
        self._loaded(slot, model, info)
        self.loads += 1
        log.info("loaded %s (%d MB)", slot.name, slot.size // 2**20)
        if slot.uses == 0:  # its requests left while it loaded: it starts idle
            slot.uses = 1
            self.release(slot)

    def _fits(self, slot: Slot, others: list[Slot]) -> bool:
        if len(others) + 1 > self.max_loaded:
            return False
        return self.max_memory is None or sum(s.size for s in others) + slot.size <= self.max_memory

    async def _make_room(self, slot: Slot) -> None:
        """Unload idle models, least recently used first, until `slot` fits; wait while the rest are busy."""
        slot.waiting_for_room = True
        try:
            while True:
                if self._changed is None:
                    self._changed = asyncio.Event()
                changed = self._changed
                others = [s for s in self.slots.values() if s is not slot]
                if self._fits(slot, others):
                    return
                idle = sorted((s for s in others if s.loaded and s.uses == 0 and not s.pinned), key=lambda s: s.last_used)
                if idle:
                    await self._unload(idle[0])
                    continue
                if not any(s.uses > 0 or not s.loaded for s in others):
                    log.warning("loading %s over the budget: the other loaded models are pinned", slot.name)
                    return
                try:  # the others are busy: wait for one to finish (or unload), then look again
                    await asyncio.wait_for(changed.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            slot.waiting_for_room = False

    async def _expire(self, slot: Slot) -> None:
        if (self.slots.get(slot.key) is slot and slot.loaded and slot.uses == 0 and slot.expires_at is not None
                and time.time() >= slot.expires_at - 0.05):
            await self._unload(slot)

    async def _unload(self, slot: Slot) -> None:
        if self.slots.get(slot.key) is slot:
            del self.slots[slot.key]
        slot._stop_timer()
        box, slot.model = [slot.model], None
        self.unloads += 1
        log.info("unloading %s", slot.name)
        await self.worker.call(free, box)
        self._notify()

    def shutdown(self) -> None:
        for s in self.slots.values():
            s._stop_timer()
        self._loader.shutdown(wait=False, cancel_futures=True)


def _load_and_describe(load: Callable[[], object]) -> tuple[object, dict]:
    model = load()
    return model, model.info()


__all__ = ["Pool", "Slot", "parse_keep_alive", "free", "FOREVER", "DEFAULT_KEEP_ALIVE"]
