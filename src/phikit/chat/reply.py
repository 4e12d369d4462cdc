"""`Reply`: what a stream of text Chunks and ToolEvents adds up to, in one place.

    reply = Reply()
    for item in model_stream:          # Chunks, and ToolEvents from the tool loop
        reply.feed(item)               # returns the item, so a caller can print or frame it too
    reply.text, reply.calls, reply.finish_reason, reply.stats, reply.logprobs

Text before a call belonged to the turn that made the call, so a ToolEvent clears the text kept so far:
`text` is the answer after the last call. The CLI, the tool loop's `collect` and the server's blocking
routes all drain their streams through it.
"""

from __future__ import annotations

from ..engine.types import Chunk, Logprob, Result, Stats
from .tool_loop import ToolEvent


class Reply:
    def __init__(self) -> None:
        self._parts: list[str] = []
        self.events: list[ToolEvent] = []  # every call, run or not, in order
        self.logprobs: list[Logprob] = []  # of the generated tokens, where asked for
        self.finish_reason: str | None = None
        self.stats: Stats | None = None
        self.last: Chunk | None = None  # the chunk that carried the finish reason

    def feed(self, item: Chunk | ToolEvent) -> Chunk | ToolEvent:
        """Add one stream item; returns it."""
        if isinstance(item, ToolEvent):
            self.events.append(item)
            self._parts.clear()
            return item
        self._parts.append(item.text)
        self.logprobs += item.logprobs or []
        if item.finish_reason is not None:
            self.finish_reason, self.stats, self.last = item.finish_reason, item.stats, item
        return item

    @property
    def text(self) -> str:
        """The answer's text (after the last call)."""
        return "".join(self._parts)

    @property
    def calls(self) -> list[ToolEvent]:
        """The calls the caller must run (the tool loop ran the others): ToolEvents without a result."""
        return [e for e in self.events if e.result is None]

    def result(self, model_name: str) -> Result:
        """A Result of the reply: the stripped text, and every call (as dicts) in `extra["tool_calls"]`."""
        s = self.stats or Stats()
        return Result(
            text=self.text.strip(), finish_reason=self.finish_reason or "stop", prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens, ttft_s=round(s.ttft_s, 4), tokens_per_s=round(s.tokens_per_s, 2),
            total_s=round(s.total_s, 4), model=model_name, extra={"tool_calls": [e.to_dict() for e in self.events]},
        )


__all__ = ["Reply"]
