"""One question, answered with any mix of reasoning and tools, or as schema-valid JSON.

    from phikit.chat import ask
    r = ask(model, "What is 17 * 23?", reason=True)
    r.text, r.extra["answer"]
    ask(model, "Compute 2**20", tools=["calculator"]).extra["tool_calls"]
    ask(model, "A person", json_schema={...}).extra["json"]

`stream_ask` yields the same as it happens (text Chunks, ToolEvents); `ask`
drains it. The CLI's `phikit ask` is a thin layer over these.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..engine.types import Chunk, Result, SamplingParams, join
from ..errors import PhikitError
from ..formats import Message
from ..tools import ToolLike, get_tools
from .reasoning import extract_answer, with_reasoning
from .structured import parse_output, with_schema
from .tool_loop import DEFAULT_MAX_ROUNDS, ToolEvent, collect, run_tools


def stream_ask(
    model,
    prompt: str | list[Message],
    *,
    system: str | None = None,
    reason: bool = False,
    tools: Iterable[ToolLike | str] | None = None,
    json_schema: dict | None = None,
    max_tool_rounds: int = DEFAULT_MAX_ROUNDS,
    tool_choice: str = "auto",
    params: SamplingParams | None = None,
    **sampling,
) -> Iterator[Chunk | ToolEvent]:
    """Stream the answer to `prompt` (text or messages). `tools` may name built-ins ("calculator").

    Tools and a JSON schema do not combine, nor do reasoning and a JSON schema
    (the steps would have nowhere to go): both raise PhikitError.
    """
    from ..model import as_messages, make_params

    if json_schema is not None and (tools or reason):
        raise PhikitError("--json-schema cannot be combined with --tools or --reason: the output must be only the JSON")
    if max_tool_rounds < 0:
        raise PhikitError(f"max_tool_rounds must be >= 0, got {max_tool_rounds}")
    msgs = as_messages(prompt)
    if system:
        msgs = [{"role": "system", "content": system}] + [m for m in msgs if m.get("role") != "system"]
    if reason:
        msgs = with_reasoning(msgs)
    p = make_params(params, **sampling)
    if json_schema is not None:
        msgs = with_schema(msgs, json_schema)
        p.json_schema = json_schema
    if tools:
        names = [t for t in tools if isinstance(t, str)]
        rest = [t for t in tools if not isinstance(t, str)]
        return run_tools(model, msgs, get_tools(names) + list(rest), p, max_tool_rounds, tool_choice)
    return model.stream(msgs, p)


def finish(result: Result, *, reason: bool = False, json_schema: dict | None = None) -> Result:
    """Add `answer` (reasoning) or `json` (structured) to a drained result's extra; raises PhikitError on cut-off JSON."""
    if reason:
        result.extra["answer"] = extract_answer(result.text)
    if json_schema is not None:
        result.extra["json"] = parse_output(result.text, json_schema, result.finish_reason)
    return result


def ask(model, prompt: str | list[Message], **kw) -> Result:
    """The drained `stream_ask`: a Result whose extra has `answer` (reason=True), `tool_calls` (tools=) or `json` (json_schema=)."""
    events = stream_ask(model, prompt, **kw)
    result = collect(events, model.name) if kw.get("tools") else join(events, model.name)
    return finish(result, reason=kw.get("reason", False), json_schema=kw.get("json_schema"))
