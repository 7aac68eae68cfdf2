"""`es-merging bench NAME [--json out.json] [bench options]` (or `--suite NAME`): run one benchmark
from ``es_merging.bench.BENCHES``; its JSON goes to stdout and, with --json, to a file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from es_merging.errors import EsMergingError


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (merge-scale, inspect, ...); `bench --list` names them",
                       description="Run a registered benchmark. Options after NAME belong to the benchmark "
                                   "(see `es-merging bench NAME --help`).")
    p.add_argument("name", nargs="?", help="benchmark name")
    # REMAINDER: everything after `--suite NAME` belongs to the benchmark, as after NAME
    p.add_argument("--suite", nargs=argparse.REMAINDER, metavar="NAME ...", help="benchmark name (same as NAME)")
    p.add_argument("--json", dest="json_out", nargs="?", const="-", metavar="FILE",
                   help="also write the result JSON to this file (bare --json: stdout only, which is always written)")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from es_merging.bench import load_benches

    benches = load_benches()
    if args.list:
        print(json.dumps({name: getattr(fn, "help", "") for name, fn in sorted(benches.items())}, indent=2))
        return 0
    if args.suite:
        name, rest = args.suite[0], list(args.suite[1:])
    else:
        name, rest = args.name, list(args.rest)
    if not name:
        raise EsMergingError(f"bench: name a benchmark ({', '.join(sorted(benches))})")
    if name not in benches:
        raise EsMergingError(f"unknown benchmark {name!r}; choose one of {sorted(benches)}")
    fn = benches[name]
    parser = argparse.ArgumentParser(prog=f"es-merging bench {name}", description=getattr(fn, "help", None))
    parser.add_argument("--json", dest="json_out", nargs="?", const="-", default=args.json_out, metavar="FILE",
                        help="also write the result JSON here (bare --json: stdout only)")
    if getattr(fn, "add_arguments", None):
        fn.add_arguments(parser)
    bench_args = parser.parse_args(rest)
    result = fn(bench_args)
    text = json.dumps(result, indent=2)
    if bench_args.json_out and bench_args.json_out != "-":
        Path(bench_args.json_out).write_text(text + "\n")
    print(text)
    return 0
