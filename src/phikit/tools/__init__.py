"""Tools a model can call: declarations, built-ins, user files, and the call parsers.

    from phikit.tools import tool_from_function, get_tools
    tools = get_tools(["calculator"], files=["mytools.py"])
    tools[0].invoke({"expression": "2 + 2"}).to_dict()   # {"name": "calculator", "result": 4}

The loop that lets a model use them is `phikit.chat.run_tools`.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import DataError, PhikitError
from .builtin import BUILTINS
from .schema import Tool, ToolCall, ToolResult, tool_from_function, tool_from_schema

ToolLike = Tool | Callable[..., Any] | dict


def as_tool(item: ToolLike) -> Tool:
    """A Tool from a Tool, a plain function, or an OpenAI-style schema dict (then the caller runs it)."""
    if isinstance(item, Tool):
        return item
    if isinstance(item, dict):
        return tool_from_schema(item)
    if callable(item):
        return tool_from_function(item)
    raise DataError(f"cannot use {item!r} as a tool: pass a function, a Tool or an OpenAI-style schema dict")


def as_tools(items: Iterable[ToolLike]) -> list[Tool]:
    tools = [as_tool(t) for t in items]
    names = [t.name for t in tools]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"two tools share the name {', '.join(dup)}: tool names must be unique")
    return tools


def load_tools_file(path: str | Path) -> list[Tool]:
    """Tools from a Python file: its `TOOLS` list if it has one, else every public function defined in it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tools file {p} not found")
    name = f"phikit_user_tools_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and typing need the module registered while it runs
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise DataError(f"tools file {p} failed to import: {type(e).__name__}: {e}") from None
    items = getattr(mod, "TOOLS", None)
    if items is None:
        items = [f for n, f in vars(mod).items()
                 if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == name]
    if not items:
        raise DataError(f"tools file {p} defines no public functions (or an empty TOOLS list)")
    try:
        return as_tools(items)
    except PhikitError as e:
        raise DataError(f"{p}: {e}") from None


def get_tools(names: Iterable[str] = (), files: Iterable[str | Path] = ()) -> list[Tool]:
    """Built-in tools by name plus every tool from `files`; unknown names raise DataError listing the built-ins."""
    tools: list[Tool] = []
    for n in names:
        if n not in BUILTINS:
            raise DataError(f"unknown built-in tool {n!r}; built-ins: {', '.join(BUILTINS)} (user tools come from --tools-file)")
        tools.append(tool_from_function(BUILTINS[n]))
    for f in files:
        tools.extend(load_tools_file(f))
    return as_tools(tools)


def builtin_tools() -> list[Tool]:
    return [tool_from_function(f) for f in BUILTINS.values()]


__all__ = ["Tool", "ToolCall", "ToolResult", "tool_from_function", "tool_from_schema", "as_tool", "as_tools",
           "get_tools", "load_tools_file", "builtin_tools", "BUILTINS"]
