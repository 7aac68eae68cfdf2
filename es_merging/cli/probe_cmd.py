"""`es-merging probe build`: a probe from a table, explicit lists, or the embedded zoo."""
from __future__ import annotations

import json
import sys

from es_merging.errors import ProbeError


def register(sub) -> None:
    p = sub.add_parser("probe", help="build and inspect probes")
    psub = p.add_subparsers(dest="probe_command", metavar="PROBE_COMMAND", required=True)
    b = psub.add_parser("build", help="build a probe JSON")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", help="CSV/TSV with columns smiles, protein, cell (comma-separated ranked genes)")
    src.add_argument("--zoo", help="draw samples from the embedded world of this zoo directory")
    src.add_argument("--smiles", nargs="+", help="drug SMILES (pair with --proteins/--cells)")
    b.add_argument("--proteins", nargs="+", default=[])
    b.add_argument("--cells", nargs="+", default=[], help="each a comma-separated ranked gene list")
    b.add_argument("--pairing", choices=["zip", "random"], default="zip")
    b.add_argument("--out", required=True)
    b.add_argument("--n", type=int, default=None, help="number of samples (default: all; zoo: 64)")
    b.add_argument("--strategy", choices=["random", "diverse"], default="random")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--skip-invalid", action="store_true", help="drop invalid rows (recorded in the probe) instead of failing")
    b.set_defaults(func=_build)
    s = psub.add_parser("show", help="summarise a probe JSON")
    s.add_argument("path")
    s.set_defaults(func=_show)


def _build(args) -> int:
    from es_merging.probe import build_probe, samples_from_lists, samples_from_table
    from es_merging.zoo import probe_from_zoo

    if args.zoo:
        probe = probe_from_zoo(args.zoo, n=64 if args.n is None else args.n, seed=args.seed, strategy=args.strategy)
    elif args.table:
        probe = build_probe(samples_from_table(args.table), n=args.n, strategy=args.strategy, seed=args.seed,
                            source=f"table:{args.table}", skip_invalid=args.skip_invalid)
    else:
        if args.pairing == "random" and args.n is None:
            raise ProbeError("--pairing random needs --n")
        rows = samples_from_lists(args.smiles, args.proteins, args.cells, pairing=args.pairing, n=args.n,
                                  seed=args.seed)
        probe = build_probe(rows, n=None if args.pairing == "random" else args.n, strategy=args.strategy,
                            seed=args.seed, source="lists", skip_invalid=args.skip_invalid)
    probe.save(args.out)
    json.dump({"out": args.out, **probe.summary()}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _show(args) -> int:
    from es_merging.probe import Probe

    json.dump(Probe.load(args.path).summary(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
