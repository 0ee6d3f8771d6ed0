"""The ``trimask`` command: one sub-command per module in ``trimask.commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

from trimask.errors import TrimaskError

# Each module has ``register(subparsers)`` which adds its sub-commands and
# sets ``func`` (called with the parsed args, returning an exit code or None).
COMMAND_MODULES = (
    "serve",
    "embed",
    "weights",
    "export_onnx",
    "coco",
    "train",
    "samples",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimask",
        description="Interactive image annotation with Segment Anything: "
        "three candidate masks per click, saved as COCO RLE.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"trimask.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"trimask.commands.{name}":
                continue  # a command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except TrimaskError as exc:
        print(f"trimask {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"trimask {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
