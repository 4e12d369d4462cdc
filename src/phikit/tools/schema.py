"""Tools: an OpenAI-style JSON schema plus the Python function that runs it.

`tool_from_function` turns a plain function into a Tool from its signature,
type hints and docstring; a parameter without a hint is an error here, at
declaration time, not when the model first calls it. `Tool.invoke` validates
arguments against the schema (jsonschema) and never raises: a bad argument or
an exception inside the tool comes back as an error result the model can read.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import DataError

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass
class ToolCall:
    """One call the model asked for. `error` is set when the call itself could not be read."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    error: str | None = None

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class ToolResult:
    """What a call produced: `value` on success, `error` (a message for the model) otherwise."""

    name: str
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"name": self.name, "error": self.error} if self.error is not None else {"name": self.name, "result": self.value}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, default=str)


@dataclass
class Tool:
    """A callable tool: name, description, JSON-schema `parameters` and the function (None: the caller runs it)."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any] | None = None

    def schema(self) -> dict:
        """The OpenAI-style declaration `{"type": "function", "function": {...}}`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def validate(self, arguments: Any) -> str | None:
        """None if `arguments` fit the schema, else a message naming each problem."""
        from jsonschema import Draft202012Validator

        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}"
        errors = sorted(Draft202012Validator(self.parameters).iter_errors(arguments), key=lambda e: list(e.path))
        if not errors:
            return None
        return "; ".join(f"{'/'.join(map(str, e.path)) or 'arguments'}: {e.message}" for e in errors)

    def invoke(self, arguments: Any) -> ToolResult:
        """Validate and run; never raises for the model's mistakes or the tool's own exceptions."""
        problem = self.validate(arguments)
        if problem:
            return ToolResult(self.name, error=f"invalid arguments for {self.name}: {problem}")
        if self.fn is None:
            return ToolResult(self.name, error=f"{self.name} has no implementation here")
        try:
            return ToolResult(self.name, value=self.fn(**arguments))
        except Exception as e:  # the model reads the failure and may try again
            return ToolResult(self.name, error=f"{type(e).__name__}: {e}")


def tool_from_schema(schema: dict, fn: Callable[..., Any] | None = None) -> Tool:
    """A Tool from an OpenAI-style declaration (with or without the `{"type": "function"}` wrapper)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    f = schema.get("function", schema) if isinstance(schema, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
        raise DataError('a tool schema needs a "name": use {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    params = f.get("parameters") or {"type": "object", "properties": {}}
    try:
        Draft202012Validator.check_schema(params)
    except SchemaError as e:
        raise DataError(f"tool {f['name']}: its parameters are not a valid JSON schema: {e.message}") from None
    return Tool(f["name"], f.get("description", ""), params, fn)


def tool_from_function(fn: Callable[..., Any], name: str | None = None) -> Tool:
    """A Tool from a function's signature, type hints and docstring.

    Supported hints: str, int, float, bool, list[X], dict, Literal[...], Enum
    subclasses and `X | None`. Raises DataError for a parameter without a hint,
    an unsupported hint or *args/**kwargs.
    """
    tname = name or fn.__name__
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise DataError(f"tool {tname}: cannot read its type hints ({e})") from None
    doc, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
    props: dict[str, dict] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise DataError(f"tool {tname}: *{p.name} cannot be described to a model; give every parameter a name and a type hint")
        if p.name not in hints:
            raise DataError(f"tool {tname}: parameter {p.name!r} has no type hint; add one (e.g. `{p.name}: str`) so the model knows what to pass")
        prop = _json_type(hints[p.name], f"tool {tname}, parameter {p.name!r}")
        if p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif p.default is not None and not isinstance(p.default, enum.Enum):
            prop["default"] = p.default
        props[p.name] = prop
    params = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return Tool(tname, doc, params, fn)


def _json_type(hint: Any, where: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _json_type(rest[0], where)
        return {"anyOf": [_json_type(a, where) for a in rest]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if hint is list or origin is list:
        return {"type": "array", "items": _json_type(args[0], where)} if args else {"type": "array"}
    if hint is dict or origin is dict:
        return {"type": "object"}
    if hint is typing.Any:
        return {}
    raise DataError(f"{where}: type {hint!r} has no JSON schema here; use str, int, float, bool, list[...], dict, Literal or an Enum")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The description (text before any Args section) and per-parameter lines (Google or Sphinx style)."""
    args: dict[str, str] = {}
    for m in re.finditer(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.M):
        args[m.group(1)] = m.group(2).strip()
    sect = re.search(r"^(Args|Arguments|Parameters):\s*$(.*?)(?=^\S|\Z)", doc, re.M | re.S)
    if sect:
        for m in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", sect.group(2), re.M):
            args[m.group(1)] = m.group(2).strip()
    desc = re.split(r"^(?:Args|Arguments|Parameters|Returns|Raises):\s*$|^\s*:param", doc, maxsplit=1, flags=re.M)[0]
    return " ".join(desc.split()), args
