"""`es-merging merge`: merge experts into one merged-model directory (progress on stderr, the
result summary as JSON on stdout)."""
from __future__ import annotations

import argparse
import json

from es_merging.errors import MergeError


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge experts (ES-Merging or a baseline) into one model directory",
                       description="Merge LoRA or dense experts that share one base. Baselines need no probe; "
                                   "the ES family needs --probe. Prints a JSON summary on stdout.")
    p.add_argument("--base", help="base model directory (HF checkpoint, safetensors)")
    p.add_argument("--experts", nargs="+", metavar="DIR", help="expert directories (2 or more)")
    p.add_argument("--method", default="es", help="merge method (default es; see --list-methods)")
    p.add_argument("--probe", help="probe JSON (needed by es, es_layer, es_element)")
    p.add_argument("--out", help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--mode", choices=["factor", "delta"], help="factor (LoRA default) or delta (dense default)")
    p.add_argument("--rank", type=int, help="delta mode with LoRA experts: re-factor by truncated SVD to this rank")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, repeatable (e.g. --set density=0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (at the very end)")
    p.add_argument("--shard-size-mb", type=int, default=512, help="maximum size of one dense output shard")
    p.add_argument("--batch-size", type=int, default=8, help="probe batch size for the signals")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="device for the signals")
    bundle = p.add_mutually_exclusive_group()
    bundle.add_argument("--bundle-base", dest="bundle_base", action="store_const", const=True, default=None,
                        help="copy the base into out/base (default: when it is under 2 GB)")
    bundle.add_argument("--no-bundle-base", dest="bundle_base", action="store_const", const=False)
    p.add_argument("--list-methods", action="store_true", help="print the merge methods and their parameters as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from es_merging.methods.base import REGISTRY, parse_set_options

    if args.list_methods:
        import es_merging.methods  # noqa: F401  (fills the registry)

        print(json.dumps([REGISTRY[name].describe() for name in sorted(REGISTRY)], indent=2))
        return 0
    missing = [flag for flag, value in (("--base", args.base), ("--experts", args.experts), ("--out", args.out)) if not value]
    if missing:
        raise MergeError(f"merge needs {', '.join(missing)} (see es-merging merge --help)")
    from pydantic import ValidationError

    from es_merging.merge_api import run_merge
    from es_merging.options import MergeOptions

    try:
        opts = MergeOptions(base=args.base, experts=args.experts, method=args.method, mode=args.mode,
                            params=parse_set_options(args.sets), probe=args.probe, out=args.out,
                            overwrite=args.overwrite, seed=args.seed, rank=args.rank,
                            shard_size_mb=args.shard_size_mb, batch_size=args.batch_size, device=args.device,
                            bundle_base=args.bundle_base)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise MergeError(f"invalid merge options: {problems}") from None
    from es_merging.cli.progress import ProgressPrinter

    result = run_merge(opts, progress=None if args.quiet else ProgressPrinter())
    print(json.dumps(result.summary(), indent=2))
    return 0
