"""Writing outputs so that nothing the user had is lost and no partial file is left
under the final name: build beside the target under a temporary name, rename at the end."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import PhikitError


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing `out` unless `force`; make sure its folder exists."""
    if out.exists() and not force:
        raise PhikitError(f"{out} already exists: choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _temp_beside(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextmanager
def atomic_path(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out` to write a file or directory to; on success
    it replaces `out` (only if `force` when `out` exists), on any error it is removed."""
    check_out(out, force)
    tmp = _temp_beside(out)
    _remove(tmp)
    try:
        yield tmp
        if out.exists():
            # Move the old one aside first so a failed rename cannot lose both.
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        _remove(tmp)


def size_of(p: Path) -> int:
    """Bytes in a file, or in all files under a directory."""
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
