"""phikit tools: list the tools a model can be given, or run one directly (no model needed).

    phikit tools list [--tools-file mytools.py] [--json]
    phikit tools call calculator '{"expression": "2 ** 10"}'
"""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="tools_cmd", metavar="COMMAND", required=True)
    ls = sub.add_parser("list", help="show the built-in tools (and those of --tools-file) with their schemas")
    ls.add_argument("--tools-file", action="append", default=[], help="Python file whose functions become tools")
    ls.add_argument("--json", action="store_true", help="print the OpenAI-style schemas as JSON")
    call = sub.add_parser("call", help="run one tool with JSON arguments and print its JSON result")
    call.add_argument("name", help="tool name")
    call.add_argument("arguments", nargs="?", default="{}", help="JSON object of arguments (default {})")
    call.add_argument("--tools-file", action="append", default=[], help="Python file whose functions become tools")


def _all_tools(files: list[str]):
    from ..tools import BUILTINS, get_tools

    return get_tools(list(BUILTINS), files)


def run(args) -> int:
    from ..errors import DataError

    tools = _all_tools(args.tools_file)
    if args.tools_cmd == "list":
        if args.json:
            print(json.dumps([t.schema() for t in tools], indent=2, ensure_ascii=False))
            return 0
        for t in tools:
            print(f"{t.name}: {t.description}")
            print("  parameters: " + json.dumps(t.parameters, ensure_ascii=False))
        return 0
    by_name = {t.name: t for t in tools}
    if args.name not in by_name:
        raise DataError(f"no tool named {args.name!r}; available: {', '.join(by_name)} (add yours with --tools-file)")
    try:
        arguments = json.loads(args.arguments)
    except json.JSONDecodeError as e:
        raise DataError(f"the arguments are not JSON ({e}); pass an object such as '{{\"expression\": \"2+2\"}}'") from None
    result = by_name[args.name].invoke(arguments)
    print(result.to_json())
    return 0 if result.ok else 1
