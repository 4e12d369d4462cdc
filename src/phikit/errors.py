"""One family of user-facing errors. Each message says what to do next.

The CLI prints the message (no traceback); the server maps the class to an
HTTP status through `status`.
"""


class PhikitError(Exception):
    """Base of every error a user can cause. `status` is the HTTP status it maps to."""

    status = 400


class ModelNotFoundError(PhikitError):
    status = 404


class ModelFilesError(PhikitError):
    """A model directory or file is missing a piece (weights, tokenizer, config)."""

    status = 400


class DeviceError(PhikitError):
    """The requested device or quantisation cannot run on this machine."""

    status = 400


class ContextLengthError(PhikitError):
    """A prompt does not fit the model's context window."""

    status = 400


class DataError(PhikitError):
    """Input data (a file, a JSONL line, a schema) is malformed."""

    status = 400


class BusyError(PhikitError):
    """The server is at its capacity for now (its KV cache is full); the same request can be sent again."""

    status = 503


class MissingDependencyError(PhikitError):
    """An optional dependency is not installed; the message carries the pip command."""

    status = 500


def require(module: str, pip_name: str | None = None, why: str = ""):
    """Import an optional dependency or raise MissingDependencyError with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"pip install {pip_name or module}"
        raise MissingDependencyError(
            f"{why + ': ' if why else ''}the Python package '{pip_name or module}' is not installed "
            f"({e}). Install it with: {hint}"
        ) from e


def decode_utf8(data: bytes, where: str) -> str:
    """`data` decoded as UTF-8, or DataError naming `where`, the line and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{where}:{line}: not valid UTF-8 (byte {data[e.start:e.start + 1]!r} at offset {e.start}, column {col} "
            "of that line): save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix or remove that line"
        ) from None
