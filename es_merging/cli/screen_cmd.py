"""`es-merging screen`: score every drug x protein x cell combination (or explicit triples) and
write them ranked by the probability of one answer option to a CSV.

Inputs: ``--smiles``/``--smiles-file`` (lines "SMILES [name]", or a CSV with a smiles column and an
optional name/id column), ``--proteins``/``--proteins-file`` (FASTA, or one sequence per line),
``--cells``/``--cells-file`` (lines "[name<TAB>]G1,G2,...", or an .h5ad file: its first
``--h5ad-limit`` cells, genes ranked by expression), or ``--triples FILE`` (CSV with smiles,
protein, cell columns). The product is refused above ``--limit`` rows. The CSV is written to a
temporary file and renamed at the end. A JSON summary goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from es_merging.cli.predict_cmd import add_model_args, load_cli_model
from es_merging.errors import EsMergingError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("screen", help="rank drug x protein x cell combinations by an option's probability",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--task", default="dti")
    p.add_argument("--smiles", nargs="+", default=[], metavar="SMILES")
    p.add_argument("--smiles-file", type=Path)
    p.add_argument("--proteins", nargs="+", default=[], metavar="SEQ")
    p.add_argument("--proteins-file", type=Path)
    p.add_argument("--cells", nargs="+", default=[], metavar="'G1,G2,...'")
    p.add_argument("--cells-file", type=Path)
    p.add_argument("--h5ad-limit", type=int, default=100, help="cells read from an .h5ad --cells-file")
    p.add_argument("--triples", type=Path, help="explicit rows instead of a product (CSV: smiles,protein,cell)")
    p.add_argument("--option", default=None, help="the answer option to rank by (default: the task's positive)")
    p.add_argument("--out", type=Path, required=True, help="ranked CSV to write")
    p.add_argument("--limit", type=int, default=100_000, help="refuse products with more rows (default 100000)")
    p.add_argument("--top", type=int, default=None, help="keep only the N best rows in the CSV")
    p.add_argument("--support", type=Path, help="labelled examples (CSV: smiles/protein/cell/label)")
    p.add_argument("--k", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_run)


def read_smiles_file(path: Path) -> list:
    text = _read(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        if not rows or "smiles" not in {k.lower() for k in rows[0]}:
            raise EsMergingError(f"{path}: a CSV of drugs needs a 'smiles' column")
        out = []
        for r in rows:
            low = {k.lower(): (v or "").strip() for k, v in r.items() if k}
            name = low.get("name") or low.get("id") or low.get("drug_id")
            out.append((name, low["smiles"]) if name else low["smiles"])
        return out
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        out.append((" ".join(parts[1:]), parts[0]) if len(parts) > 1 else parts[0])
    return out


def read_proteins_file(path: Path) -> list:
    text = _read(path)
    if text.lstrip().startswith(">"):
        from es_merging.modalities.protein import split_fasta

        out = []
        for chunk in split_fasta(text):
            header, _, seq = chunk[1:].partition("\n")
            out.append((header.split()[0] if header.split() else f"protein{len(out)}", "".join(seq.split())))
        return out
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_cells_file(path: Path, limit: int) -> list:
    if path.suffix.lower() == ".h5ad":
        from es_merging.modalities.cell import cells_from_h5ad

        return [(c.id or f"cell{i}", c.genes[:64]) for i, c in enumerate(cells_from_h5ad(path, limit=limit))]
    out = []
    for line in _read(path).splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" in line:
            name, genes = line.split("\t", 1)
            out.append((name.strip(), genes))
        else:
            out.append(line.strip())
    return out


def read_triples(path: Path) -> list[dict]:
    from es_merging.probe import samples_from_table

    return samples_from_table(path)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise EsMergingError(f"cannot read {path} ({exc})") from None


def _run(args) -> int:
    from es_merging.cli.progress import ProgressPrinter
    from es_merging.predict import get_task, load_support
    from es_merging.screen import screen

    task = get_task(args.task)
    smiles = list(args.smiles) + (read_smiles_file(args.smiles_file) if args.smiles_file else [])
    proteins = list(args.proteins) + (read_proteins_file(args.proteins_file) if args.proteins_file else [])
    cells = list(args.cells) + (read_cells_file(args.cells_file, args.h5ad_limit) if args.cells_file else [])
    triples = read_triples(args.triples) if args.triples else None
    support = load_support(args.support) if args.support else None
    if support is not None and not args.k:
        args.k = min(4, len(support))
    model = load_cli_model(args)
    result = screen(model, task, out=args.out, smiles=smiles or None, proteins=proteins or None,
                    cells=cells or None, triples=triples, option=args.option, limit=args.limit, top_n=args.top,
                    support=support, k=args.k, batch_size=args.batch_size, progress=ProgressPrinter())
    json.dump(result.model_dump(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
