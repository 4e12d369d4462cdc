"""`Reply`: what a stream of text Chunks and ToolEvents adds up to, in one place.

    reply = Reply()
    for item in model_stream:          # Chunks, and ToolEvents from the tool loop
        d = reply.feed(item)           # what this item adds: d.text, d.logprobs, d.call, d.done
        ...                            # a streaming caller frames d as it comes
    reply.text, reply.calls, reply.finish_reason, reply.stats, reply.logprobs

Text before a call belonged to the turn that made the call, so a ToolEvent clears the text kept so far:
`text` is the answer after the last call. The CLI, the tool loop's `collect` and the server's routes,
blocking and streaming, all read their streams through it: none of them looks at the items' types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.types import Chunk, Logprob, Result, Stats
from .tool_loop import ToolEvent


@dataclass
class Delta:
    """What one stream item adds to a reply."""

    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)
    call: ToolEvent | None = None  # a tool call (run by the tool loop when it has a result; else the client runs it)
    done: Chunk | None = None  # the last chunk: finish reason and the generation's stats

    @property
    def client_call(self) -> ToolEvent | None:
        """The call, where the client must run it."""
        return self.call if self.call is not None and self.call.result is None else None


class Reply:
    def __init__(self) -> None:
        self._parts: list[str] = []
        self.events: list[ToolEvent] = []  # every call, run or not, in order
        self.logprobs: list[Logprob] = []  # of the generated tokens, where asked for
        self.finish_reason: str | None = None
        self.stats: Stats | None = None
        self.last: Chunk | None = None  # the chunk that carried the finish reason

    def feed(self, item: Chunk | ToolEvent) -> Delta:
        """Add one stream item; returns what it added."""
        if isinstance(item, ToolEvent):
            self.events.append(item)
            self._parts.clear()
            return Delta(call=item)
        self._parts.append(item.text)
        self.logprobs += item.logprobs or []
        if item.finish_reason is not None:
            self.finish_reason, self.stats, self.last = item.finish_reason, item.stats, item
        return Delta(item.text, item.logprobs or [], done=item if item.finish_reason is not None else None)

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


__all__ = ["Delta", "Reply"]
