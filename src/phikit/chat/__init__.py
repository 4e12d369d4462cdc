"""Chat on top of the engine: conversations, step-by-step reasoning, the tool loop and JSON output.

- `Conversation`: multi-turn history kept inside the context (`send(..., reason=True)`).
- `ask` / `stream_ask`: one question with `reason=`, `tools=` or `json_schema=`.
- `run_tools`: the tool loop as a stream of text Chunks and ToolEvents; `collect` drains it.
- `Reply`: what such a stream adds up to (text after the last call, calls, finish reason, stats, logprobs).
- `extract_answer`: the final answer from a reasoning (or any) reply.
"""

from .ask import ask, finish, stream_ask
from .conversation import Conversation
from .reply import Reply
from .reasoning import REASON_PROMPT, extract_answer, parse_number, with_reasoning
from .structured import load_schema, parse_output, with_schema
from .tool_loop import DEFAULT_MAX_ROUNDS, ToolEvent, collect, run_tools

__all__ = [
    "Conversation", "ask", "stream_ask", "finish", "run_tools", "collect", "Reply", "ToolEvent", "DEFAULT_MAX_ROUNDS",
    "extract_answer", "parse_number", "with_reasoning", "REASON_PROMPT", "load_schema", "parse_output", "with_schema",
]
