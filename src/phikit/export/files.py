"""Writing outputs so that nothing the user had is lost and no partial file is left
under the final name: build beside the target under a temporary name, rename at the end.

The temporary name is `.NAME.partial-PID` (and `.NAME.partial-PID.SUFFIX` for a writer's own
scratch file beside it: the GGUF K-quant path's `.f16`, GPTQ's `.autoround` folder). A killed
export leaves them behind; the next export to the same folder removes those whose process is
gone (`remove_stale_partials`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import PhikitError

log = logging.getLogger("phikit")


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing `out` unless `force`; make sure its folder exists."""
    if out.exists() and not force:
        raise PhikitError(f"{out} already exists: choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _temp_beside(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's process (or a PID we cannot ask about): keep
        return True
    return True


PARTIAL = re.compile(r"\.(.+)\.partial-(\d+)(\.[\w-]+)?")


def remove_stale_partials(folder: Path) -> list[str]:
    """Remove what killed exports left in `folder`: each `.NAME.partial-PID[.SUFFIX]` of a process that is no longer
    running. Returns one note per removal, each also logged as a warning. A live export's files are kept."""
    if not folder.is_dir():
        return []
    notes = []
    for p in sorted(folder.iterdir()):
        m = PARTIAL.fullmatch(p.name)
        if not m or _alive(int(m[2])):
            continue
        try:
            size = size_of(p)
            _remove(p)
        except OSError as e:
            notes.append(f"could not remove {p}, left by an interrupted export (process {m[2]}): {e}")
        else:
            notes.append(f"removed {p} ({size / 1e6:.1f} MB), left by an interrupted export of {m[1]} (process {m[2]}, no longer running)")
        log.warning("%s", notes[-1])
    return notes


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
