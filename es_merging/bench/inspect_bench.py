"""Inspect throughput: SMILES/s and proteins/s through ``inspect_molecules`` / ``inspect_proteins``
in one Python thread (RDKit and ProtParam run single-threaded here, so this is one core).

Inputs are generated, seeded and offline: drug-like molecules assembled from scaffolds and
substituents (all distinct, so the descriptor cache never hits in the timed "cold" runs) and protein
sequences with natural residue frequencies; about 2% of each are invalid on purpose, since error
paths are part of real batches. Reported: the median of ``repeats`` runs.
"""
from __future__ import annotations

import json
import platform
import random
import statistics
import time

_SCAFFOLDS = [
    "c1ccc(cc1){0}", "c1cc({0})ccc1{1}", "c1cc({0})cc({1})c1{2}", "c1ncc({0})cc1{1}", "c1cnc(nc1{0}){1}",
    "C1CCN(CC1{0}){1}", "c1ccc2[nH]c({0})cc2c1{1}", "c1ccc2nc({0})ccc2c1{1}", "O=C(N{0})c1ccc({1})cc1",
    "c1cc(sc1{0}){1}", "C1CN(CCN1{0}){1}", "c1nc({0})c2cc({1})ccc2n1",
]
_SUBSTITUENTS = [
    "C", "CC", "OC", "F", "Cl", "Br", "C(F)(F)F", "C#N", "O", "N", "NC(C)=O", "C(=O)O", "C(=O)OC", "C(=O)N",
    "S(=O)(=O)N", "N1CCOCC1", "N1CCN(C)CC1", "c1ccccc1", "c1ccncc1", "OCC", "CC(C)C", "NC(=O)c1ccccc1",
    "C(=O)Nc1ccc(F)cc1", "CN(C)C", "OCCN1CCOCC1", "Nc1ncccn1",
]
# Bigger substituents (aryl, heterocycle and amide linkers carrying a substituent of their own):
# they bring the set to drug size (mean ~25 heavy atoms, like approved kinase inhibitors ~30).
_LINKED = ["C(=O)Nc1ccc(cc1){0}", "Oc1ccc(cc1){0}", "c1ccc(nc1){0}", "NC(=O)c1cccc(c1){0}", "CCN1CCC(CC1){0}",
           "S(=O)(=O)Nc1ccc(cc1){0}", "c1cnn(c1){0}"]
# Distinct ring-bond digits per layer (scaffold 1-2, linker 7, substituent 8) so that a filled slot
# never closes the scaffold's open ring by accident; only the deliberate "C9" is invalid.
_LINKED = [x.replace("1", "7") for x in _LINKED]
_SUBSTITUENTS = [x.replace("1", "8") for x in _SUBSTITUENTS]
# UniProt-like background frequencies of the 20 residues (percent).
_AA_FREQ = {"A": 8.3, "R": 5.5, "N": 4.1, "D": 5.5, "C": 1.4, "Q": 3.9, "E": 6.7, "G": 7.1, "H": 2.3, "I": 5.9,
            "L": 9.7, "K": 5.8, "M": 2.4, "F": 3.9, "P": 4.7, "S": 6.6, "T": 5.3, "W": 1.1, "Y": 2.9, "V": 6.9}


def make_smiles(n: int, seed: int = 0, invalid_fraction: float = 0.02) -> list[str]:
    """``n`` distinct SMILES strings, ``invalid_fraction`` of them broken (an unclosed ring)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        scaffold = rng.choice(_SCAFFOLDS)
        slots = scaffold.count("{")
        fill = [rng.choice(_LINKED).format(rng.choice(_SUBSTITUENTS)) if rng.random() < 0.5
                else rng.choice(_SUBSTITUENTS) for _ in range(slots)]
        smiles = scaffold.format(*fill)
        if rng.random() < invalid_fraction:
            smiles += "C9"  # ring bond 9 never closes
        if smiles not in seen:
            seen.add(smiles)
            out.append(smiles)
    return out


def make_proteins(n: int, seed: int = 0, min_len: int = 50, max_len: int = 600,
                  invalid_fraction: float = 0.02, ambiguous_fraction: float = 0.03) -> list[str]:
    rng = random.Random(seed)
    letters, weights = zip(*_AA_FREQ.items())
    out = []
    for _ in range(n):
        seq = ["M"] + rng.choices(letters, weights, k=rng.randint(min_len, max_len) - 1)
        r = rng.random()
        if r < invalid_fraction:
            seq[rng.randrange(1, len(seq))] = "J"
        elif r < invalid_fraction + ambiguous_fraction:
            seq[rng.randrange(1, len(seq))] = "X"
        out.append("".join(seq))
    return out


def _rate(func, items, repeats: int, before=None) -> tuple[float, float, list[float], list]:
    """(median items per wall second, median items per CPU second of this process, wall runs, results).
    The CPU rate is the steadier number on a machine shared with other jobs."""
    rates, cpu_rates, results = [], [], []
    for _ in range(repeats):
        if before:
            before()
        t0, c0 = time.perf_counter(), time.process_time()
        results = func(items)
        rates.append(len(items) / (time.perf_counter() - t0))
        cpu_rates.append(len(items) / max(time.process_time() - c0, 1e-9))
    return statistics.median(rates), statistics.median(cpu_rates), [round(r, 1) for r in rates], results


def rdkit_floor(smiles: list[str], repeats: int) -> dict:
    """CPU microseconds per valid molecule of the three RDKit calls whose output the full detail
    level reports as RDKit makes it and no shortcut can replace: parsing with sanitisation
    (``MolFromSmiles``), the canonical SMILES and the InChIKey (the InChI library's own work is most
    of it). Medians of ``repeats`` passes, bare calls in a loop, no Python around them. Their sum
    bounds what any full-detail route through RDKit can reach on this machine, before the other ten
    descriptors and the result objects: ``ceiling_per_cpu_s``."""
    from rdkit import Chem, rdBase

    blocker = rdBase.BlockLogs()  # invalid items log to stderr; the timed module captures its own
    try:
        mols = [m for m in map(Chem.MolFromSmiles, smiles) if m is not None]
        calls = {"parse": (Chem.MolFromSmiles, smiles), "canonical_smiles": (Chem.MolToSmiles, mols),
                 "inchikey": (Chem.MolToInchiKey, mols)}
        floor = {}
        for name, (call, items) in calls.items():
            passes = []
            for _ in range(repeats):
                c0 = time.process_time()
                for item in items:
                    call(item)
                passes.append(1e6 * (time.process_time() - c0) / max(1, len(mols)))
            floor[name] = round(statistics.median(passes), 1)
    finally:
        del blocker
    total = round(sum(floor.values()), 1)
    return {"cpu_us_per_molecule": floor, "total_cpu_us": total, "ceiling_per_cpu_s": round(1e6 / total, 1)}


def bench_inspect(n: int = 5000, seed: int = 0, repeats: int = 3) -> dict:
    """Throughput of the inspect functions; returns a JSON-ready dict. ``smiles_per_s`` and
    ``proteins_per_s`` are medians of ``repeats`` cold runs (wall clock); ``*_per_cpu_s`` divide by
    this process's CPU time instead (the one-core rate; the steadier number on a shared machine).
    Molecules are timed at both detail levels: ``smiles_*`` is the default ``detail="full"``
    (every descriptor), ``smiles_basic_*`` is ``detail="basic"`` (without QED and InChIKey);
    ``meets_target`` compares each one-core rate with the 2,000 items/s target. Cold runs start
    with the descriptor cache and the atom memo (molecule_atom_memo) empty, as a fresh process;
    ``smiles_atom_memo_warm_per_cpu_s`` runs the same molecules again with the atom memo kept.
    ``smiles_per_s_screen_200_distinct`` is a screen-like batch of ``n`` rows over 200 distinct
    SMILES (the descriptor cache answers the repeats). ``rdkit_floor``: see :func:`rdkit_floor`, in the
    same run, so that the full rate can be read against what RDKit's own calls allow here."""
    import functools
    import os

    import rdkit

    from es_merging.modalities import molecule, protein

    load_before = [round(x, 2) for x in os.getloadavg()]
    smiles = make_smiles(n, seed)
    seqs = make_proteins(n, seed)
    levels = {}
    for detail in ("full", "basic"):
        rate, cpu, runs, res = _rate(functools.partial(molecule.inspect_molecules, detail=detail), smiles, repeats,
                                     before=molecule.clear_caches)
        levels[detail] = {"per_s": round(rate, 1), "per_cpu_s": round(cpu, 1),
                          "cpu_us_per_item": round(1e6 / cpu, 1), "runs": runs, "results": res}
    # The same molecules again with the atom memo kept (a server that has described molecules before):
    # descriptors forgotten, atom terms remembered.
    _warm, warm_cpu, warm_runs, _ = _rate(molecule.inspect_molecules, smiles, repeats, before=functools.partial(molecule.clear_caches, atom_terms=False))
    floor = rdkit_floor(smiles, repeats)
    mol_res = levels["full"].pop("results")
    levels["basic"].pop("results")
    # A screen: n rows over 200 distinct drugs (GDSC2 has 170), cache cleared first, so 200 misses.
    rng = random.Random(seed)
    screen = [rng.choice(smiles[:200]) for _ in range(n)]
    screen_rate, _, _, _ = _rate(molecule.inspect_molecules, screen, 1, before=molecule.clear_caches)
    prot_rate, prot_cpu, prot_runs, prot_res = _rate(protein.inspect_proteins, seqs, repeats)
    heavy = [r.descriptors["heavy_atoms"] for r in mol_res if r.ok]
    target = 2000
    return {
        "n": n,
        "seed": seed,
        "repeats": repeats,
        "smiles_per_s": levels["full"]["per_s"],
        "smiles_per_cpu_s": levels["full"]["per_cpu_s"],
        "smiles_runs": levels["full"]["runs"],
        "smiles_basic_per_s": levels["basic"]["per_s"],
        "smiles_basic_per_cpu_s": levels["basic"]["per_cpu_s"],
        "smiles_basic_runs": levels["basic"]["runs"],
        "smiles_detail_levels": levels,
        "smiles_per_s_screen_200_distinct": round(screen_rate, 1),
        "smiles_atom_memo_warm_per_cpu_s": round(warm_cpu, 1),
        "smiles_atom_memo_warm_runs": warm_runs,
        "rdkit_floor": floor,
        "full_over_floor": round(levels["full"]["cpu_us_per_item"] / floor["total_cpu_us"], 2),
        "smiles_invalid": sum(not r.ok for r in mol_res),
        "mean_heavy_atoms": round(statistics.mean(heavy), 1) if heavy else None,
        "proteins_per_s": round(prot_rate, 1),
        "proteins_per_cpu_s": round(prot_cpu, 1),
        "protein_runs": prot_runs,
        "proteins_invalid": sum(not r.ok for r in prot_res),
        "mean_protein_length": round(statistics.mean(len(s) for s in seqs), 1),
        "target_per_s": target,
        "meets_target": {  # on one core, i.e. per CPU-second of this process; wall shown above
            "smiles_full": levels["full"]["per_cpu_s"] >= target,
            "smiles_basic": levels["basic"]["per_cpu_s"] >= target,
            "proteins": prot_cpu >= target,
        },
        "load_avg_before": load_before,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rdkit": rdkit.__version__,
        "machine": platform.machine(),
        "threads": 1,
    }


def run(args) -> int:
    """Entry point for a `bench inspect` CLI: ``args.n``, ``args.seed``, ``args.repeats`` (optional)."""
    result = bench_inspect(n=getattr(args, "n", 5000) or 5000, seed=getattr(args, "seed", 0) or 0,
                           repeats=getattr(args, "repeats", 3) or 3)
    print(json.dumps(result, indent=2))
    return 0
