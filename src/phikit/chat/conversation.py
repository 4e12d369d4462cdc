"""A multi-turn conversation that keeps its history inside the model's context."""

from __future__ import annotations

from typing import Callable, Iterator

from ..engine.types import Chunk, SamplingParams
from ..errors import ContextLengthError


class Conversation:
    """History of one chat. `send` streams the reply and records it, even when interrupted.

    Before each turn the oldest user/assistant exchanges are dropped until the
    prompt plus `max_tokens` fits the context; `on_trim(n)` is told how many
    messages went. A single message that cannot fit raises ContextLengthError.
    """

    def __init__(self, model, system: str | None = None, on_trim: Callable[[int], None] | None = None):
        self.model = model
        self.system = system
        self.history: list[dict] = []
        self.on_trim = on_trim or (lambda n: None)
        self.last_answer: str | None = None  # extracted final answer of the last send(reason=True)

    def reset(self) -> None:
        self.history.clear()

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _fit(self, params: SamplingParams) -> None:
        be = self.model.backend
        budget = be.context_length - min(params.max_tokens, be.context_length // 2)
        dropped = 0
        while len(self.history) > 1 and be.count_tokens(be.render(self.messages())) > budget:
            # drop the oldest exchange: a user turn and everything up to the next user turn
            cut = 1
            while cut < len(self.history) - 1 and self.history[cut]["role"] != "user":
                cut += 1
            del self.history[:cut]
            dropped += cut
        if dropped:
            self.on_trim(dropped)
        n = be.count_tokens(be.render(self.messages()))
        if n >= be.context_length:
            self.history.pop()
            raise ContextLengthError(
                f"this message makes a prompt of {n} tokens but the context is {be.context_length} tokens: send something shorter"
            )

    def send(self, text: str, params: SamplingParams, reason: bool = False) -> Iterator[Chunk]:
        """Add a user turn and stream the assistant's reply; the reply (partial on interrupt) joins the history.

        reason=True asks for labelled steps and a final `Answer:` line for this
        turn (the instruction is not stored); `last_answer` then holds the answer.
        """
        from .reasoning import extract_answer, with_reasoning

        self.history.append({"role": "user", "content": text})
        self._fit(params)
        parts: list[str] = []
        msgs = with_reasoning(self.messages()) if reason else self.messages()
        stream = self.model.stream(msgs, params)
        try:
            for chunk in stream:
                parts.append(chunk.text)
                yield chunk
        finally:
            stream.close()
            self.history.append({"role": "assistant", "content": "".join(parts)})
            if reason:
                self.last_answer = extract_answer("".join(parts))
