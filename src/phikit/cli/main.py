"""The `phikit` command. Verbs live one per module and are imported only when used
(argument setup imports nothing heavy), so `phikit --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# verb -> (module under phikit.cli, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "ask": ("ask", "answer one prompt, streaming"),
    "chat": ("chat", "multi-turn chat in the terminal"),
    "models": ("models", "list known models and where their weights are"),
    "tools": ("tools", "list the tools a model can call, or run one directly"),
    "rag": ("rag", "answers from your own documents, with sources (index, ask, search, ls, rm)"),
    "eval": ("eval", "measure a model: SQuAD 2.0 (grounded), GSM8K, before/after reports"),
    "serve": ("serve", "serve a model over OpenAI- and Ollama-compatible HTTP APIs, with a web chat"),
    "train": ("train", "fine-tune a LoRA / QLoRA adapter (SQuAD 2.0, chat or Q/A JSONL)"),
    "export": ("export", "export a model + adapter as merged weights, GGUF or an Ollama Modelfile"),
    "convert": ("convert", "rewrite a Phi-3-family model in the Llama layout (split q/k/v and gate/up)"),
    "quantize": ("quantize", "save a model pre-quantised in NF4; --dynamic keeps its most NF4-sensitive layers in 16-bit"),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="phikit", description="Run, fine-tune, evaluate, export and serve small language models locally.")
    p.add_argument("--version", action="version", version=f"phikit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, (mod, helptext) in VERBS.items():
        sp = sub.add_parser(verb, help=helptext, description=helptext)
        m = importlib.import_module(f"phikit.cli.{mod}")
        m.add_arguments(sp)
        sp.set_defaults(_run=m.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import PhikitError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="phikit: %(message)s", stream=sys.stderr)
    if not args.verb:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except PhikitError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
