"""phikit ask "PROMPT": one answer, streamed to the terminal (or one JSON object with --json).

--reason asks for labelled steps and a final `Answer:` line (the extracted
answer is `answer` in --json output); --tools/--tools-file let the model call
tools (calls are shown on stderr, or listed as `tool_calls` in --json output);
--json-schema makes the output JSON valid against a schema, by constrained decoding.
"""

from __future__ import annotations

import io
import json
import sys

from .common import add_model_args, add_sampling_args, load_from_args, params_from_args


def add_arguments(p) -> None:
    p.add_argument("prompt", help="the question or instruction ('-' reads standard input)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g = p.add_argument_group("reasoning, tools, structured output")
    g.add_argument("--reason", action="store_true", help="reason in labelled steps and end with 'Answer: ...'")
    g.add_argument("--tools", default="", help="comma-separated built-in tools the model may call (calculator,now)")
    g.add_argument("--tools-file", action="append", default=[], help="Python file whose functions become tools (repeatable)")
    g.add_argument("--tool-choice", choices=["auto", "required"], default="auto",
                   help="required: the first reply must be a tool call (enforced by constrained decoding)")
    g.add_argument("--max-tool-rounds", type=int, default=None, help="most rounds of tool calls before stopping (default 5)")
    g.add_argument("--json-schema", default=None, metavar="FILE", help="JSON schema file the output must match")
    add_model_args(p)
    add_sampling_args(p)


def read_stdin() -> str:
    """Standard input as text (UTF-8); DataError naming the line and byte offset of the first byte that is not."""
    from ..errors import decode_utf8

    buf = getattr(sys.stdin, "buffer", None)
    if buf is None:  # a text stream without bytes under it (already decoded)
        return sys.stdin.read()
    return io.StringIO(decode_utf8(buf.read(), "standard input"), newline=None).read()  # newlines as sys.stdin reads them


def run(args) -> int:
    from ..chat import DEFAULT_MAX_ROUNDS, Reply, collect, finish, load_schema, stream_ask
    from ..engine.types import join
    from ..tools import get_tools

    prompt = read_stdin() if args.prompt == "-" else args.prompt
    schema = load_schema(args.json_schema) if args.json_schema else None
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    tools = get_tools(names, args.tools_file) if (names or args.tools_file) else None  # errors before loading a model
    model = load_from_args(args)
    kw = dict(system=args.system, reason=args.reason, tools=tools, json_schema=schema, params=params_from_args(args),
              max_tool_rounds=DEFAULT_MAX_ROUNDS if args.max_tool_rounds is None else args.max_tool_rounds)
    if tools:
        kw["tool_choice"] = args.tool_choice
    elif args.tool_choice != "auto":
        from ..errors import PhikitError

        raise PhikitError("--tool-choice needs --tools or --tools-file")
    events = stream_ask(model, prompt, **kw)
    if args.json:
        result = collect(events, model.name) if tools else join(events, model.name)
        print(json.dumps(finish(result, reason=args.reason, json_schema=schema).to_dict(), ensure_ascii=False, default=str))
        return 0
    reply = Reply()
    try:
        for ev in events:
            d = reply.feed(ev)
            if d.call:
                call = d.call.to_dict()
                shown = call.get("result", call.get("error", "(not run)"))
                print(f"[tool {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}) -> "
                      f"{json.dumps(shown, ensure_ascii=False, default=str)}]", file=sys.stderr)
            if d.text:
                sys.stdout.write(d.text)
                sys.stdout.flush()
    finally:
        events.close()
        sys.stdout.write("\n")
    if reply.finish_reason == "tool_rounds":
        print("[stopped: the model was still calling tools after --max-tool-rounds rounds]", file=sys.stderr)
    if schema is not None:  # constrained output can only be invalid when max_tokens cut it short
        from ..chat import parse_output

        parse_output(reply.text, schema, reply.finish_reason or "stop")
    return 0
