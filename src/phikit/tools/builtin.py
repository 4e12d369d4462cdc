"""Built-in tools: `calculator` and `now`.

The calculator walks Python's AST over a whitelist of number literals and
arithmetic operators; it never calls eval/exec, and names, attributes, calls,
subscripts and the like are refused. Exponents and results are bounded so a
model (or a user) cannot make it spend minutes or gigabytes on one expression.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from datetime import datetime, timezone as _tz

MAX_EXPRESSION = 500  # characters
MAX_EXPONENT = 1000
MAX_DIGITS = 100  # |result| < 10**MAX_DIGITS

_BIN = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.BitXor: operator.pow,  # people (and models) write 2^10 for a power; XOR makes no sense here
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression with + - * / // % ** (or ^) and parentheses, e.g. "(3 + 4) * 2.5".

    Args:
        expression: the arithmetic expression; numbers and operators only, no names or functions.
    """
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION} characters")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expression)  # 1,000,000 -> 1000000
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    value = _eval(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        a, b = _eval(node.left), _eval(node.right)
        op = _BIN[type(node.op)]
        if op is operator.pow:
            _check_power(a, b)
        try:
            return _bounded(op(a, b))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)") from None
    raise CalculatorError(f"{type(node).__name__} is not allowed: only numbers, + - * / // % ** and parentheses")


def _check_power(base: int | float, exp: int | float) -> None:
    if abs(exp) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exp} is larger than {MAX_EXPONENT}")
    if base == 0 and exp < 0:
        raise CalculatorError("division by zero")
    # log10 of the result, checked before computing it: 10**999 would take long and be useless.
    if abs(base) > 1 and exp * math.log10(abs(base)) >= MAX_DIGITS:
        raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")


def _bounded(v: int | float | complex) -> int | float:
    if isinstance(v, complex):
        raise CalculatorError("the result is a complex number")
    if isinstance(v, float) and not math.isfinite(v):
        raise CalculatorError("the result is not a finite number")
    if abs(v) >= 10**MAX_DIGITS:
        raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")
    return v


def now(timezone: str = "UTC") -> dict:
    """The current date and time.

    Args:
        timezone: an IANA time zone name such as "Europe/Paris" (default UTC).
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        zone = _tz.utc if timezone.upper() == "UTC" else ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as 'Europe/Paris' or 'UTC'") from None
    t = datetime.now(zone)
    return {"iso": t.isoformat(timespec="seconds"), "date": t.date().isoformat(), "time": t.strftime("%H:%M:%S"),
            "weekday": t.strftime("%A"), "timezone": timezone}


BUILTINS = {"calculator": calculator, "now": now}
