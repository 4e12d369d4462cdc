"""The tool loop: the model asks for calls, phikit runs them and feeds the results back.

    for ev in run_tools(model, "What is 17 * 23?", [calculator]):
        if isinstance(ev, ToolEvent): print(ev.to_dict())
        else: print(ev.text, end="")

Each round renders the conversation with the tool declarations (the chat
format decides how), streams the reply, parses it with the format's parser
(`phikit.tools.parsers`), validates the arguments against each tool's schema,
runs the tools and appends the results as `tool` turns. It ends when the model
answers in text (finish_reason of that turn), after `max_rounds` rounds of calls
("tool_rounds"), or when a call is to a schema-only tool the caller must run
("tool_calls", OpenAI's meaning). The model's mistakes (unknown tool, bad JSON,
invalid arguments) and the tools' exceptions go back to it as error results.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from ..engine.types import Chunk, Result, SamplingParams, Stats
from ..errors import PhikitError
from ..formats import Message
from ..tools import Tool, ToolCall, ToolLike, ToolResult, as_tools
from ..tools.parsers import get_parser

DEFAULT_MAX_ROUNDS = 5


@dataclass
class ToolEvent:
    """A call the model made and what it returned (`result` None: not run, see the final finish_reason)."""

    call: ToolCall
    result: ToolResult | None
    round: int

    def to_dict(self) -> dict:
        d = {"round": self.round, "name": self.call.name, "arguments": self.call.arguments}
        if self.result is not None:
            d.update({k: v for k, v in self.result.to_dict().items() if k != "name"})
        return d


def run_tools(
    model,
    messages: str | list[Message],
    tools: Iterable[ToolLike],
    params: SamplingParams | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    tool_choice: str = "auto",
    **sampling,
) -> Iterator[Chunk | ToolEvent]:
    """Yield text Chunks of the answer and a ToolEvent per call; the last item is a Chunk with finish_reason and summed stats.

    `tools` are functions, Tools or OpenAI-style schema dicts. tool_choice
    "required" makes the first reply a call by constrained decoding (the
    reply must match the JSON-call schema of the tools), which lets even a
    small model that never calls tools on its own use them. Raises
    PhikitError for bad tool declarations and ContextLengthError when the
    conversation outgrows the context.
    """
    from ..model import as_messages, make_params

    tools = as_tools(tools)
    by_name = {t.name: t for t in tools}
    params = make_params(params, **sampling)
    parser = get_parser(model.fmt.tool_style)
    schemas = [t.schema() for t in tools]
    if tool_choice not in ("auto", "required"):
        raise PhikitError(f"tool_choice must be 'auto' or 'required', got {tool_choice!r}")
    msgs = as_messages(messages)
    total = Stats()
    for rnd in range(max_rounds + 1):
        forced = tool_choice == "required" and rnd == 0 and max_rounds > 0
        turn_params = replace(params, json_schema=calls_schema(tools)) if forced else params
        hold = _HoldBack(parser.MARKERS)
        parts: list[str] = []
        finish = "stop"
        stream = model.stream(msgs, turn_params, tools=schemas)
        try:
            for c in stream:
                parts.append(c.text)
                out = hold.feed(c.text)
                if out:
                    yield Chunk(text=out, token_ids=c.token_ids)
                if c.finish_reason is not None:
                    finish = c.finish_reason
                    _add(total, c.stats)
        finally:
            stream.close()
        parsed = parser.parse("".join(parts), by_name)
        if not parsed.calls:
            tail = hold.flush()
            if tail:
                yield Chunk(text=tail)
            yield Chunk(finish_reason=finish, stats=total)
            return
        if rnd == max_rounds:
            for call in parsed.calls:
                yield ToolEvent(call, None, rnd)
            yield Chunk(finish_reason="tool_rounds", stats=total)
            return
        for i, call in enumerate(parsed.calls):
            call.id = call.id or f"call_{rnd}_{i}"
        msgs.append({"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in parsed.calls]})
        caller_runs = False
        for call in parsed.calls:
            tool = by_name.get(call.name)
            if tool is not None and tool.fn is None and call.error is None:
                caller_runs = True
                yield ToolEvent(call, None, rnd)
                continue
            result = _run(call, tool, by_name)
            yield ToolEvent(call, result, rnd)
            msgs.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result.to_json()})
        if caller_runs:
            yield Chunk(finish_reason="tool_calls", stats=total)
            return


def calls_schema(tools: list[Tool], max_calls: int = 1) -> dict:
    """JSON schema of a list of 1..max_calls calls to `tools`, each with arguments valid for that tool."""
    one = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, "maxItems": max_calls, "items": {"anyOf": one}}


def collect(events: Iterable[Chunk | ToolEvent], model_name: str) -> Result:
    """Drain `run_tools` into a Result: the final answer's text, with `tool_calls` (dicts) in `extra`."""
    from .reply import Reply

    reply = Reply()
    for ev in events:
        reply.feed(ev)
    return reply.result(model_name)


def _run(call: ToolCall, tool: Tool | None, by_name: dict[str, Tool]) -> ToolResult:
    if call.error is not None:
        return ToolResult(call.name, error=call.error)
    if tool is None:
        return ToolResult(call.name, error=f"there is no tool named {call.name!r}; available: {', '.join(by_name) or 'none'}")
    return tool.invoke(call.arguments)


def _add(total: Stats, s: Stats | None) -> None:
    if s is None:
        return
    if not total.total_s:
        total.ttft_s = s.ttft_s  # time to the first token of the whole exchange
    total.prompt_tokens += s.prompt_tokens
    total.completion_tokens += s.completion_tokens
    total.prompt_s += s.prompt_s
    total.decode_s += s.decode_s
    total.total_s += s.total_s


class _HoldBack:
    """Holds streamed text while it may still be the start of a tool call, so raw call JSON is not printed."""

    def __init__(self, markers: tuple[str, ...]):
        self.markers = markers
        self.pending = ""
        self.open = False

    def feed(self, delta: str) -> str:
        if self.open:
            return delta
        self.pending += delta
        head = self.pending.lstrip()
        if not head or any(m.startswith(head) or head.startswith(m) for m in self.markers):
            return ""
        self.open = True
        out, self.pending = self.pending, ""
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
