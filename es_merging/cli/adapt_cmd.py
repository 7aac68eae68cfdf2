"""`es-merging adapt --zoo DIR --data-dir DIR --out DIR`: adapt a zoo's experts to the real
datasets' drugs, targets and cell lines (see :mod:`es_merging.adapt`)."""
from __future__ import annotations

import json
import os
import sys

from es_merging.cli.progress import ProgressPrinter


def register(sub) -> None:
    p = sub.add_parser("adapt", help="adapt a zoo's experts to the real datasets' entities (label-free, seeded)",
                       description="Continue each zoo expert's LoRA on the real drugs (Crippen LogP), targets "
                                   "(PROSITE family signatures) and cell lines (cancer type), mixed with the zoo's "
                                   "world; writes an adapted zoo directory (atomically).")
    p.add_argument("--zoo", required=True, help="a built zoo (es-merging zoo build)")
    p.add_argument("--data-dir", default=os.environ.get("ES_MERGING_DATA_DIR", "../shared/data"),
                   help="the shared datasets (see SOURCES.md)")
    p.add_argument("--out", required=True, help="output directory (the adapted zoo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per expert (default: the zoo preset's expert_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-fraction", type=float, default=0.5,
                   help="probability that a drawn descriptor's entity is a real one (when it has real entities)")
    p.add_argument("--heldout-fraction", type=float, default=0.25, help="real entities held out for the before/after check")
    p.add_argument("--protein-window", type=int, default=32, help="residues shown around the family signature")
    p.add_argument("--cell-genes", type=int, default=32, help="top z-scored genes per cell line")
    p.add_argument("--copy-base", action="store_true", help="copy the base instead of linking to it")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_adapt)


def _adapt(args) -> int:
    from es_merging.adapt import adapt_zoo

    record = adapt_zoo(args.zoo, args.data_dir, args.out, steps=args.steps, seed=args.seed, overwrite=args.overwrite,
                       real_fraction=args.real_fraction, heldout_fraction=args.heldout_fraction,
                       protein_window=args.protein_window, cell_genes=args.cell_genes, copy_base=args.copy_base,
                       progress=ProgressPrinter())
    summary = {
        "out": args.out, "seed": record["seed"], "steps": record["steps"], "seconds": record["seconds"],
        "labels": {m: v["labelled"] for m, v in record["labels"].items()},
        "heldout_own_slot_accuracy": {m: {k: e["heldout_real"][k]["accuracy"] for k in ("before", "after")}
                                      for m, e in record["experts"].items()},
        "heldout_own_slot_balanced_accuracy": {m: {k: e["heldout_real"][k]["balanced_accuracy"] for k in ("before", "after")}
                                               for m, e in record["experts"].items()},
        "world_own_slot_accuracy": {m: {k: e["heldout_world"][k]["accuracy"] for k in ("before", "after")}
                                    for m, e in record["experts"].items()},
    }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
