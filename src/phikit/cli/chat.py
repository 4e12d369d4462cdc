"""phikit chat: a multi-turn terminal chat. /reset, /system TEXT, /exit. Ctrl-C stops a reply, not the chat."""

from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_from_args, params_from_args

HELP = "commands: /reset (forget the history), /system TEXT (set the system prompt), /exit"


def add_arguments(p) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)


def run(args) -> int:
    from ..chat import Conversation

    model = load_from_args(args)
    params = params_from_args(args)
    conv = Conversation(model, args.system, on_trim=lambda n: print(f"[dropped the {n} oldest messages to stay within the context]", file=sys.stderr))
    print(f"phikit chat with {model.name} ({model.backend.name}). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            conv.reset()
            print("[history cleared]", file=sys.stderr)
            continue
        if text.startswith("/system"):
            conv.system = text[len("/system"):].strip() or None
            print(f"[system prompt {'set' if conv.system else 'cleared'}]", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(HELP, file=sys.stderr)
            continue
        try:
            for chunk in conv.send(text, params):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            print()
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except Exception as e:  # a PhikitError (e.g. too long) must not end the chat
            from ..errors import PhikitError

            if not isinstance(e, PhikitError):
                raise
            print(f"error: {e}", file=sys.stderr)
