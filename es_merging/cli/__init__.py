"""`es-merging` command line. Each sub-command lives in its own module ``<name>_cmd.py``
exposing ``register(subparsers)``; the module sets ``func(args) -> int`` on its parser."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from es_merging.errors import EsMergingError

# Order is the order shown in --help.
COMMANDS = ("inspect", "probe", "zoo", "adapt", "merge", "predict", "screen", "bench", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="es-merging",
        description="Assemble probes, merge biological multimodal experts with ES-Merging, predict interactions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"es_merging.cli.{name}_cmd")
        except ModuleNotFoundError as exc:  # a sub-command not shipped in this build
            if exc.name == f"es_merging.cli.{name}_cmd":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except EsMergingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
