"""Turn a file into plain text: .txt, .md, .html/.htm, .pdf.

Each reader returns text with blank lines between paragraphs (the chunker's
unit). A file that cannot be read raises `Unreadable` with a reason the
indexer lists in its summary; the run goes on with the other files.
"""

from __future__ import annotations

from pathlib import Path

SUFFIXES = {".txt": "text", ".md": "text", ".markdown": "text", ".html": "html", ".htm": "html", ".pdf": "pdf"}
# Block elements end a paragraph; inline ones (b, a, span) do not.
_BLOCKS = ("p", "div", "li", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "blockquote", "pre", "table", "ul", "ol", "dd", "dt")


class Unreadable(Exception):
    """This file is skipped; the message says why."""


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


def pdf_to_text(path: Path) -> str:
    from ..errors import require

    import logging

    pypdf = require("pypdf", "pypdf", "reading .pdf files")
    # pypdf logs its own complaints about damaged files; our summary already says what happened.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted:
            raise Unreadable("encrypted PDF")
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many kinds (PdfReadError, ValueError, KeyError...) on corrupt files
        raise Unreadable(f"corrupt or unsupported PDF ({type(e).__name__}: {e})") from e


def read_file(path: Path) -> tuple[str, list[str]]:
    """Text of a supported file and notes about how it was read. Raises Unreadable."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise Unreadable(f"unsupported file type {path.suffix or '(none)'}")
    try:
        if kind == "pdf":
            return pdf_to_text(path), []
        text, note = decode(path.read_bytes())
    except OSError as e:
        raise Unreadable(f"cannot read ({e.strerror or e})") from e
    if kind == "html":
        text = html_to_text(text)
    return text, [note] if note else []


def walk(paths: list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Supported files under `paths` (folders recursively, hidden ones skipped) and (path, reason) for the rest."""
    files: list[Path] = []
    bad: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(x.startswith(".") for x in rel) and f.suffix.lower() in SUFFIXES:
                    files.append(f.resolve())
        elif p.is_file():
            if p.suffix.lower() in SUFFIXES:
                files.append(p.resolve())
            else:
                bad.append((str(p), f"unsupported file type {p.suffix or '(none)'} (supported: {', '.join(sorted(SUFFIXES))})"))
        else:
            bad.append((str(p), "no such file or folder"))
    return list(dict.fromkeys(files)), bad
