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
