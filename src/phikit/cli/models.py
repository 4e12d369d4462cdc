"""phikit models: the registry as a table, with where each model's weights are found."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("extra", nargs="*", help="also describe these paths or hub ids")
    p.add_argument("--json", action="store_true")


def _human(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def rows(extra: list[str]) -> list[dict]:
    from ..models.registry import REGISTRY, locate, resolve

    specs = [locate(s) for s in REGISTRY.values()] + [resolve(e) for e in extra]
    return [
        {
            "name": s.name,
            "hub_id": s.hub_id,
            "format": s.format or "detect",
            "parameters": s.params,
            "context": s.context,
            "weights": s.gguf_file or s.path,
        }
        for s in specs
    ]


def run(args) -> int:
    data = rows(args.extra)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table("name", "hub id", "format", "params", "context", "weights found at")
    for r in data:
        t.add_row(r["name"], r["hub_id"] or "-", r["format"], _human(r["parameters"]), str(r["context"] or "?"),
                  r["weights"] or "[dim]not on this machine[/dim]")
    Console().print(t)
    return 0
