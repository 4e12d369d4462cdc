"""phikit ask "PROMPT": one answer, streamed to the terminal (or one JSON object with --json)."""

from __future__ import annotations

import json
import sys

from .common import add_model_args, add_sampling_args, load_from_args, params_from_args


def add_arguments(p) -> None:
    p.add_argument("prompt", help="the question or instruction ('-' reads standard input)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_args(p)
    add_sampling_args(p)


def run(args) -> int:
    from ..engine.types import join

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load_from_args(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
    stream = model.stream(messages, params_from_args(args))
    if args.json:
        print(json.dumps(join(stream, model.name).to_dict(), ensure_ascii=False))
        return 0
    try:
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    finally:
        stream.close()
        sys.stdout.write("\n")
    return 0
