"""`es-merging predict`: ask a model a task's question about drugs, proteins and cells (JSON out).

The model is a merged-model directory (``--model DIR``), or a zoo model (``--zoo DIR --expert
NAME|base``). Inputs pair up by position; a list of one item is repeated to the others' length.
Each option gets a probability (option log-likelihood scoring, never parsed free text). stdout
carries only the JSON; exit status 1 when any item is invalid (the others are still answered).

Example::

    es-merging predict --zoo /tmp/zoo --expert base --task dti \\
        --smiles "CC(=O)Oc1ccccc1C(=O)O" --protein MKTAYIAKQRQISFVKSHFSRQ
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from es_merging.errors import EsMergingError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="probability per answer option for drug/protein/cell inputs (JSON)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--task", default="dti", help="dti, drug_response, triple_effect or embedded (default dti)")
    p.add_argument("--smiles", nargs="+", default=[], metavar="SMILES")
    p.add_argument("--protein", nargs="+", default=[], metavar="SEQ", help="amino-acid sequences")
    p.add_argument("--cell", nargs="+", default=[], metavar="'G1,G2,...'",
                   help="cells as ranked, comma-separated gene lists (most expressed first)")
    p.add_argument("--support", type=Path, help="labelled examples (CSV: smiles/protein/cell/label)")
    p.add_argument("--k", type=int, default=0, help="support examples per prompt, the most similar (default 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--list-tasks", action="store_true", help="print the built-in tasks and exit")
    p.set_defaults(func=_run)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="a merged-model directory (or a zoo directory with --expert)")
    p.add_argument("--zoo", type=Path, help="an embedded zoo directory (es-merging zoo build)")
    p.add_argument("--expert", default=None, help="with --zoo: an expert name or 'base' (default base)")


def load_cli_model(args):
    from es_merging.predict import load_predictor

    if args.expert and not (args.zoo or (args.model and (args.model / "zoo.json").exists())):
        raise EsMergingError("--expert needs --zoo DIR (or --model pointing at a zoo directory)")
    return load_predictor(args.model, zoo=args.zoo, expert=args.expert)


def pair_inputs(smiles: list[str], proteins: list[str], cells: list[str]) -> list[dict]:
    lists = {"smiles": smiles, "protein": proteins, "cell": cells}
    present = {k: v for k, v in lists.items() if v}
    if not present:
        raise EsMergingError("give inputs: --smiles, --protein and/or --cell")
    n = max(len(v) for v in present.values())
    for k, v in present.items():
        if len(v) not in (1, n):
            sizes = {k2: len(v2) for k2, v2 in present.items()}
            raise EsMergingError(f"input lists pair up by position and must have equal lengths (or one item): {sizes}")
    return [{k: (v[0] if len(v) == 1 else v[i]) for k, v in present.items()} for i in range(n)]


def _run(args) -> int:
    from es_merging.predict import get_task, load_support, predict, task_names

    if args.list_tasks:
        json.dump([get_task(n).summary() for n in task_names()], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    task = get_task(args.task)
    items = pair_inputs(args.smiles, args.protein, args.cell)
    support = load_support(args.support) if args.support else None
    if support is not None and not args.k:
        args.k = min(4, len(support))
    model = load_cli_model(args)
    preds = predict(model, items, task, support=support, k=args.k, batch_size=args.batch_size)
    json.dump({"task": task.summary(), "k": args.k,
               "model": str(args.model or args.zoo), "expert": args.expert,
               "predictions": [p.model_dump() for p in preds]}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if all(p.ok for p in preds) else 1
