"""Turn a file into plain text: .txt, .md, .html/.htm, .pdf.

Each reader returns text with blank lines between paragraphs (the chunker's
unit). A file that cannot be read raises `Unreadable` with a reason the
indexer lists in its summary; the run goes on with the other files.

Paths are classified with `os.lstat`/`os.stat` before anything is opened
(`check`): a FIFO blocks whoever opens it for reading, so only regular files
are ever opened, and those with O_NONBLOCK and an `fstat` check in case the
path changed in between. Inside a folder, every entry that is not indexed
(symbolic link loops, dangling links, links to folders, FIFOs, sockets,
devices, unsupported types, unreadable files or subfolders) is returned with
its reason; only hidden names are passed over silently. A path passed
directly that cannot be indexed raises `DataError` (`check_paths`).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

from ..errors import DataError

SUFFIXES = {".txt": "text", ".md": "text", ".markdown": "text", ".html": "html", ".htm": "html", ".pdf": "pdf"}
SUPPORTED = ", ".join(sorted(SUFFIXES))
# Block elements end a paragraph; inline ones (b, a, span) do not.
_BLOCKS = ("p", "div", "li", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "blockquote", "pre", "table", "ul", "ol", "dd", "dt")
# What to do about a path passed directly that cannot be indexed, by `check`'s category.
_HINTS = {
    "missing": "check the path (to drop an indexed file from the store, use `phikit rag rm PATH --store ...`)",
    "link": "fix or remove the link, or pass the file it should point to",
    "special": "only regular files are read: save its content to a .txt file and pass that",
    "type": f"convert it to one of {SUPPORTED} or leave it out",
    "access": "make it readable or leave it out",
}


class Unreadable(Exception):
    """This file is skipped; the message says why."""


def _special(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "neither a file nor a folder"


def _os_reason(e: OSError) -> tuple[str, str]:
    """(category, reason) for an OSError raised while looking at or opening a path."""
    if e.errno == errno.ELOOP:
        return "link", "symbolic link loop (a link in the path points, directly or through other links, back to itself)"
    if e.errno == errno.ENOENT:
        return "missing", "no such file or folder"
    if e.errno == errno.ENOTDIR:
        return "missing", "no such file or folder (a part of the path is not a folder)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "access", "permission denied"
    return "access", f"cannot read ({e.strerror or e})"


def check(path: str | Path) -> tuple[str, str | None]:
    """What a path is, found with stat calls only (nothing is opened, so a FIFO cannot block).

    Returns ("dir", None), ("file", None) for a supported, readable regular file, or
    (category, reason) where category is one of the keys of `_HINTS`."""
    p = os.fspath(path)
    try:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(p)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return "link", "symbolic link loop (the link points, directly or through other links, back to itself)"
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    return "link", f"dangling symbolic link: its target '{os.readlink(p)}' does not exist"
                return "link", f"cannot follow the symbolic link ({e.strerror or e})"
    except OSError as e:
        return _os_reason(e)
    if stat.S_ISDIR(st.st_mode):
        return "dir", None
    if not stat.S_ISREG(st.st_mode):
        return "special", f"not a regular file: it is {_special(st.st_mode)}, which is never opened"
    suffix = Path(p).suffix.lower()
    if suffix not in SUFFIXES:
        return "type", f"unsupported file type {suffix or '(none)'} (supported: {SUPPORTED})"
    if not os.access(p, os.R_OK):
        return "access", "permission denied"
    return "file", None


def check_paths(paths: list[str | Path]) -> None:
    """Raise DataError naming every path given directly that is neither a folder nor an indexable file.

    Called before the store is touched, so a bad argument leaves the index as it was."""
    bad = []
    for p in paths:
        kind, why = check(p)
        if kind not in ("dir", "file"):
            bad.append(f"{p}: {why}; {_HINTS[kind]}")
    if bad:
        raise DataError("cannot index " + ("; ".join(bad) if len(bad) == 1 else "these paths:\n  " + "\n  ".join(bad))
                        + "\nNothing was indexed; the store is unchanged.")


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file. Opened non-blocking and checked with fstat, so a path that became
    a FIFO since `check` raises Unreadable instead of blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise Unreadable(_os_reason(e)[1]) from e
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise Unreadable(f"not a regular file: it is {_special(mode)}, which is never read")
        try:
            return fh.read()
        except OSError as e:
            raise Unreadable(f"cannot read ({e.strerror or e})") from e


def decode(data: bytes) -> tuple[str, str | None]:
    """Bytes -> text. Returns (text, note); note says when it was not UTF-8. Raises Unreadable for binary data."""
    if b"\x00" in data[:8192]:
        raise Unreadable("binary data (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    # Legacy 8-bit text (Windows/Latin-1) is common in real document folders; cp1252 covers
    # most of it, latin-1 decodes any byte so nothing is refused for its encoding alone.
    for enc in ("cp1252", "latin-1"):
        try:
            return data.decode(enc), f"not UTF-8, read as {enc}"
        except UnicodeDecodeError:
            continue
    raise Unreadable("undecodable text")  # unreachable: latin-1 decodes every byte


def html_to_text(html: str) -> str:
    from ..errors import require

    bs4 = require("bs4", "beautifulsoup4", "reading .html files")
    soup = bs4.BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    for tag in soup.find_all(_BLOCKS):
        tag.insert_after("\n\n")
    paras = [" ".join(p.split()) for p in soup.get_text().split("\n\n")]
    return "\n\n".join(p for p in paras if p)


def pdf_to_text(data: bytes) -> str:
    from ..errors import require

    import logging

    pypdf = require("pypdf", "pypdf", "reading .pdf files")
    # pypdf logs its own complaints about damaged files; our summary already says what happened.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise Unreadable("encrypted PDF")
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many kinds (PdfReadError, ValueError, KeyError...) on corrupt files
        raise Unreadable(f"corrupt or unsupported PDF ({type(e).__name__}: {e})") from e


def read_file(path: Path, data: bytes | None = None) -> tuple[str, list[str]]:
    """Text of a supported file (`data`: its bytes when already read) and notes about how it was read. Raises Unreadable."""
    kind = SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise Unreadable(f"unsupported file type {Path(path).suffix or '(none)'} (supported: {SUPPORTED})")
    if data is None:
        data = read_bytes(path)
    if kind == "pdf":
        return pdf_to_text(data), []
    text, note = decode(data)
    if kind == "html":
        text = html_to_text(text)
    return text, [note] if note else []


def _walk_dir(root: Path, files: list[Path], bad: list[tuple[str, str]]) -> None:
    """Supported files under `root` into `files`, (path, reason) for every other non-hidden entry into `bad`.

    Links to folders are not followed (no loops, no walking out of the tree); links to files are."""
    stack = [str(root.resolve())]
    found: list[Path] = []
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            bad.append((d, f"cannot list the folder ({_os_reason(e)[1]})"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue  # hidden files and folders (.git, .cache) are not walked
            try:
                real_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                real_dir = False
            if real_dir:
                subdirs.append(e.path)
                continue
            kind, why = check(e.path)
            if kind == "file":
                found.append(Path(e.path).resolve())
            elif kind == "dir":
                bad.append((e.path, "symbolic link to a folder, not followed (pass that folder itself to index it)"))
            else:
                bad.append((e.path, why))
        stack += reversed(subdirs)
    files += sorted(found)


def walk(paths: list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Supported files under `paths` (folders recursively, hidden entries skipped) and (path, reason) for
    every other entry found inside the folders. A path given directly that is neither a folder nor an
    indexable file raises DataError (`check_paths`) before anything is read."""
    check_paths(paths)
    files: list[Path] = []
    bad: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if check(p)[0] == "dir":
            _walk_dir(p, files, bad)
        else:
            files.append(p.resolve())
    return list(dict.fromkeys(files)), list(dict.fromkeys(bad))
