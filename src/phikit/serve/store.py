"""What a served model name stands for (`ModelDef`), and the models made with /api/create, kept on disk.

A created model is a small JSON manifest, `$PHIKIT_HOME/serve/models/<name>.json` (default
~/.phikit): where its weights are (`source`: a GGUF file, an HF folder or a registry name), its
adapter, and the SYSTEM, PARAMETERs, MESSAGEs, TEMPLATE and LICENSE its requests start from. The
weights stay where they are; copying or deleting a model copies or deletes only its manifest.
Each manifest is written beside its final name and renamed over it, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import DataError
from ..models.registry import phikit_home as home  # phikit's data folder: $PHIKIT_HOME, else ~/.phikit

log = logging.getLogger("phikit.serve")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?$")
MAX_NAME = 200


def base_name(name: str) -> str:
    """A name as requests may give it, without Ollama's default tag: 'mybot:latest' -> 'mybot'."""
    return name.strip().removesuffix(":latest")


def check_name(name: str, param: str = "model") -> str:
    """`name` without ':latest' if it can name a created model; DataError saying what a name may hold otherwise."""
    n = base_name(name)
    if not n or len(n) > MAX_NAME or not NAME.match(n) or len(quote(n, safe="")) > MAX_NAME:  # its file name must fit
        raise DataError(f"{param}: {name!r} cannot name a model: use letters, digits, '.', '_' and '-', optionally "
                        f"a 'namespace/' before and a ':tag' after (at most {MAX_NAME} characters, a '/' or ':' counting 3), e.g. 'mybot' or 'me/mybot:v2'")
    return n


@dataclass(frozen=True)
class ModelDef:
    """A served name: the weights it loads and the defaults its requests start from."""

    name: str
    source: str  # what phikit.load takes: a registry name, or the path of a GGUF file or HF folder
    adapter: str | None = None
    system: str | None = None
    template: str | None = None  # kept and shown; phikit renders with the model's chat format
    parameters: dict[str, Any] = field(default_factory=dict)  # checked by modelfile.check_parameters
    messages: tuple[dict, ...] = ()
    license: tuple[str, ...] = ()
    parent: str = ""  # the FROM as the client wrote it
    modified_at: float = 0.0
    origin: str = "created"  # "start" (the model the server was started with), "registry" or "created"

    @property
    def num_ctx(self) -> int | None:
        return self.parameters.get("num_ctx")

    def conversation(self, messages: list[dict]) -> list[dict]:
        """`messages` as Ollama runs them: the model's MESSAGEs first, and its SYSTEM before all when the request has none."""
        msgs = [*self.messages, *messages]
        if self.system and (not messages or messages[0].get("role") != "system"):
            msgs.insert(0, {"role": "system", "content": self.system})
        return msgs

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        """The request's options over this model's PARAMETERs (each given option replaces the model's)."""
        return {**self.parameters, **{k: v for k, v in given.items() if v is not None}}

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("origin")
        d["messages"], d["license"] = list(self.messages), list(self.license)
        return {"schema": 1, **d}

    @classmethod
    def from_json(cls, d: dict) -> "ModelDef":
        known = {f for f in cls.__dataclass_fields__ if f != "origin"}
        d = {k: v for k, v in d.items() if k in known}
        return cls(**{**d, "messages": tuple(d.get("messages") or ()), "license": tuple(d.get("license") or ())})


class ModelStore:
    """The created models of one folder; re-read when the folder changes (another server may share it)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else home() / "serve" / "models"
        self._stamp: int | None = None
        self._defs: dict[str, ModelDef] = {}

    def _file(self, name: str) -> Path:
        return self.folder / (quote(name.lower(), safe="") + ".json")

    def _refresh(self) -> None:
        try:
            stamp = self.folder.stat().st_mtime_ns
        except FileNotFoundError:
            self._stamp, self._defs = None, {}
            return
        if stamp == self._stamp:
            return
        defs = {}
        for f in sorted(self.folder.glob("*.json")):
            try:
                d = ModelDef.from_json(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as e:
                log.warning("skipping the damaged model manifest %s (%s): delete it, or create the model again", f, e)
                continue
            defs[d.name.lower()] = d
        self._stamp, self._defs = stamp, defs

    def all(self) -> list[ModelDef]:
        self._refresh()
        return list(self._defs.values())

    def get(self, name: str) -> ModelDef | None:
        self._refresh()
        return self._defs.get(base_name(name).lower())

    def put(self, d: ModelDef) -> ModelDef:
        """Write `d` (replacing a model of that name), stamped now."""
        d = replace(d, name=check_name(d.name), modified_at=time.time(), origin="created")
        self.folder.mkdir(parents=True, exist_ok=True)
        f = self._file(d.name)
        tmp = f.with_name(f".{f.name}.partial-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                json.dump(d.to_json(), out, ensure_ascii=False, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, f)
        finally:
            tmp.unlink(missing_ok=True)
        self._stamp = None
        return d

    def delete(self, name: str) -> bool:
        d = self.get(name)
        if d is None:
            return False
        self._file(d.name).unlink(missing_ok=True)
        self._stamp = None
        return True


__all__ = ["ModelDef", "ModelStore", "home", "base_name", "check_name"]
