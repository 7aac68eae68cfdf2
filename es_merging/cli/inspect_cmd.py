"""`es-merging inspect molecule|protein|cell ...`: validate and describe inputs, print JSON.

stdout carries only the JSON list of item results (so it can be piped); exit status 1 when any
item is invalid, 0 otherwise (2 for a usage or file-level error, from the dispatcher).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from es_merging.errors import InvalidInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="validate and describe molecules, proteins or cells (JSON out)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="modality", metavar="MODALITY", required=True)

    mol = sub.add_parser("molecule", help="SMILES strings (RDKit descriptors)")
    mol.add_argument("smiles", nargs="*", metavar="SMILES")
    mol.add_argument("--file", type=Path, help="a text file with one SMILES per line (first column)")
    mol.add_argument("--max-length", type=int, default=2000)
    mol.add_argument("--detail", choices=("full", "basic"), default="full",
                     help="full: every descriptor (default); basic: without QED and InChIKey, ~2x faster")
    mol.set_defaults(func=_molecule)

    prot = sub.add_parser("protein", help="protein sequences (ProtParam descriptors)")
    prot.add_argument("sequences", nargs="*", metavar="SEQ")
    prot.add_argument("--fasta", type=Path, help="a FASTA file; each record is one item")
    prot.add_argument("--policy", choices=("keep", "replace", "reject"), default="keep",
                      help="X/B/Z/U/O: keep (warn), replace (B->D Z->E U->C O->K, X deleted) or reject")
    prot.add_argument("--min-length", type=int, default=1)
    prot.add_argument("--max-length", type=int, default=5000)
    prot.set_defaults(func=_protein)

    cell = sub.add_parser("cell", help="single-cell profiles: h5ad rows or ranked gene lists")
    cell.add_argument("--h5ad", type=Path, help="an AnnData .h5ad file (read on disk, any size)")
    cell.add_argument("--obs", nargs="+", default=None, metavar="NAME", help="obs names of the cells to read")
    cell.add_argument("--obs-index", nargs="+", type=int, default=None, metavar="I", help="row positions")
    cell.add_argument("--limit", type=int, default=10, help="without --obs: the first N cells (default 10)")
    cell.add_argument("--layer", default=None, help="read this layer instead of X")
    cell.add_argument("--use-raw", action="store_true", help="read .raw.X instead of X")
    cell.add_argument("--genes", action="append", default=[], metavar="'G1,G2,...'",
                      help="a ranked, comma-separated gene list (repeat for several cells)")
    cell.add_argument("--value-kind", choices=("auto", "counts", "normalized"), default="auto")
    cell.add_argument("--top-k", type=int, default=50, help="genes in the Cell-o1 text span")
    cell.set_defaults(func=_cell)


def _emit(results) -> int:
    json.dump([r.model_dump() for r in results], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if all(r.ok for r in results) else 1


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(str(path), f"cannot read the {what} file ({exc.__class__.__name__}: {exc})") from None


def _molecule(args: argparse.Namespace) -> int:
    from es_merging.modalities.molecule import inspect_molecules

    items = list(args.smiles)
    if args.file:
        items += [ln.split()[0] for ln in _read_text(args.file, "SMILES").splitlines() if ln.strip()]
    if not items:
        raise InvalidInputError("", "no SMILES given", hint="pass SMILES arguments or --file")
    return _emit(inspect_molecules(items, max_length=args.max_length, detail=args.detail))


def _protein(args: argparse.Namespace) -> int:
    from es_merging.modalities.protein import inspect_proteins, split_fasta

    items = list(args.sequences)
    if args.fasta:
        items += split_fasta(_read_text(args.fasta, "FASTA"))
    if not items:
        raise InvalidInputError("", "no sequence given", hint="pass sequences or --fasta FILE")
    return _emit(inspect_proteins(items, policy=args.policy, min_length=args.min_length, max_length=args.max_length))


def _cell(args: argparse.Namespace) -> int:
    from es_merging.modalities.cell import inspect_cell_profiles

    items: list = list(args.genes)
    if args.h5ad:
        obs = (args.obs or []) + (args.obs_index or []) or None
        items.insert(0, {"h5ad": str(args.h5ad), "obs": obs, "limit": args.limit, "layer": args.layer,
                         "use_raw": args.use_raw})
    elif args.obs or args.obs_index or args.layer or args.use_raw:
        raise InvalidInputError("--obs/--layer/--use-raw", "need --h5ad FILE")
    if not items:
        raise InvalidInputError("", "no cell given", hint="pass --h5ad FILE [--obs NAME ...] or --genes 'A,B,C'")
    return _emit(inspect_cell_profiles(items, top_k=args.top_k, value_kind=args.value_kind))
