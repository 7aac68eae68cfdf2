"""`es-merging zoo build`: build the embedded default world (base + three experts)."""
from __future__ import annotations

import json
import sys

from es_merging.cli.progress import ProgressPrinter


def register(sub) -> None:
    p = sub.add_parser("zoo", help="build the embedded default (tiny base + molecule/protein/cell experts)")
    zsub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    b = zsub.add_parser("build", help="build the zoo offline and reproducibly")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--preset", default="tiny", choices=["tiny", "test"])
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--threads", type=_threads, default="auto",
                   help="torch threads for the build: a number, or 'auto' (the cores other work leaves idle)")
    b.set_defaults(func=_build)


def _threads(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"--threads must be 'auto' or a positive integer, not {value!r}")
    return n


def _build(args) -> int:
    from es_merging.zoo.build import build_zoo

    report = build_zoo(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite,
                       progress=ProgressPrinter(), threads=args.threads)
    summary = {"out": args.out, "preset": args.preset, "seed": args.seed, "gates": report["gates"],
               "timings_s": report["timings_s"], "threads": report["threads"]}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if report["preset"]["gates"] and not report["gates"]["all_pass"]:
        print("warning: the zoo misses a quality gate (see zoo.json)", file=sys.stderr)
    return 0
