"""Molecules as SMILES (RDKit): parse with RDKit's own reason on failure, describe, fingerprint.

RDKit reports *why* a SMILES fails only through its C++ error log (``MolFromSmiles`` just returns
``None``). We capture that log per call with ``rdBase.CaptureErrorLog`` so the reason lands in the
error message and nothing is written to stdout (an MCP stdio server would be corrupted by it).
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Iterable, Literal, Sequence

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import Crippen, QED, rdFingerprintGenerator, rdinchi
from rdkit.Chem import rdMolDescriptors as rdmd

from es_merging.errors import InvalidInputError
from es_merging.modalities.base import ItemResult, check_batch, display, error_result

__all__ = [
    "parse_molecule", "describe_molecule", "qed", "crippen_logp", "morgan_fingerprint", "morgan_fingerprints",
    "tanimoto", "tanimoto_matrix", "inspect_molecules", "DETAILS",
]

Detail = Literal["full", "basic"]
_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s?")
_WHITESPACE = re.compile(r"\s")


class _PythonLogCapture:
    """Fallback for RDKit without ``rdBase.CaptureErrorLog`` (older than 2025): route RDKit's logs
    through Python logging (a global switch, once) and collect the records while active."""

    _routed = False

    def __enter__(self):
        if not _PythonLogCapture._routed:
            rdBase.LogToPythonLogger()
            _PythonLogCapture._routed = True
        self._records: list[str] = []
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self._records.append(record.getMessage())
        self._logger = logging.getLogger("rdkit")
        self._logger.addHandler(self._handler)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate
        return False

    @property
    def messages(self) -> str:
        return "\n".join(self._records)


# Captures are process-global in RDKit: concurrent parses in threads may see each other's reasons.
_capture_errors = getattr(rdBase, "CaptureErrorLog", _PythonLogCapture)


def _rdkit_reason(log: str, smiles: str) -> str:
    """Condense RDKit's multi-line log into one line: drop timestamps, the echoed input, the caret
    line and the redundant 'Failed parsing SMILES' summary."""
    parts: list[str] = []
    for line in log.splitlines():
        line = " ".join(_TIMESTAMP.sub("", line).split())
        if not line or line == smiles or set(line) <= {"~", "^", " "}:
            continue
        line = line.removeprefix("SMILES Parse Error:").strip().rstrip(":")
        if line.startswith("Failed parsing SMILES") or line in parts:
            continue
        parts.append(line)
    return "; ".join(parts) or "RDKit could not parse it"


def parse_molecule(smiles: str, *, max_length: int = 2000) -> Chem.Mol:
    """Parse and sanitise one SMILES. Raises :class:`InvalidInputError` quoting the item and RDKit's reason.

    Surrounding whitespace is stripped; whitespace *inside* is an error because RDKit would silently
    read ``"CC O"`` as ``CC`` (the rest becomes the molecule's name).
    """
    if not isinstance(smiles, str):
        raise InvalidInputError(smiles, f"expected a SMILES string, got {type(smiles).__name__}")
    text = smiles.strip()
    if not text:
        raise InvalidInputError(smiles, "empty SMILES", hint="give a SMILES string such as 'CCO'")
    if len(text) > max_length:
        raise InvalidInputError(smiles, f"SMILES too long: {len(text)} characters > max_length={max_length}",
                                hint="raise max_length if this is intended")
    ws = _WHITESPACE.search(text)
    if ws:
        raise InvalidInputError(smiles, f"whitespace inside the SMILES at position {ws.start() + 1}",
                                hint="one SMILES per item; use '.' to join fragments")
    with _capture_errors() as capture:
        mol = Chem.MolFromSmiles(text)
    if mol is None:
        raise InvalidInputError(smiles, f"invalid SMILES (RDKit: {_rdkit_reason(capture.messages, text)})")
    if mol.GetNumAtoms() == 0:
        raise InvalidInputError(smiles, "the SMILES contains no atoms")
    return mol


# ---------------------------------------------------------------------------------------------
# Exact RDKit values, computed with less work. Every number is bit-identical to RDKit's own function
# (tests compare with Crippen.MolLogP, QED.properties / QED.qed, CalcNumRotatableBonds, CalcNumHBA
# on a few hundred varied molecules); only the route is shorter.
#
# CPU per molecule, generated drug-like SMILES (~23 heavy atoms), RDKit 2026.09, one core, each
# stage alone (min of 5 passes per 50 molecules): RDKit's route -> ours
#   Crippen LogP       ~169 -> ~113 us  no AddHs copy; heavy-atom types whose first atom is absent
#                                       are not searched for (_crippen_heavy)
#   rotatable bonds     ~51 -> ~20 us   one compiled pattern instead of a copy per call (_fast_counts)
#   Lipinski HBA        ~24 -> ~13 us   idem
#   QED alerts         ~209 -> ~100 us  alerts that cannot match are screened out from the atoms
#                                       present (_PatternScreen); the rest matched rarest atom first
#   QED acceptors, aromatic rings  ~71 -> ~50 us  same screen; no Mol copy before DeleteSubstructs
#   QED's MW, LogP, HBD, TPSA, rotatable bonds: reused from the descriptors (QED recomputes them)
# InChI (~187 us), parsing (~82 us) and the canonical SMILES (~39 us) are RDKit's and unchanged.
# A batch is described stage by stage (_describe_mols), another ~25% off.
# ---------------------------------------------------------------------------------------------
_ATOM_TOKEN = re.compile(r"\[[^\]]+\]|Br|Cl|[BCNOPSFI]|[bcnops]|\*")


@lru_cache(maxsize=4096)
def _token_key(token: str) -> tuple[int, bool, int, int] | None:
    """(atomic number, aromatic, formal charge, isotope) of one SMILES atom token; None if RDKit
    cannot read the token alone (the screen then keeps every pattern)."""
    atom = Chem.AtomFromSmiles(token)
    if atom is None:
        return None
    return atom.GetAtomicNum(), atom.GetIsAromatic(), atom.GetFormalCharge(), atom.GetIsotope()


@lru_cache(maxsize=256)  # describe_molecule asks twice per molecule (LogP, QED)
def _smiles_tokens(smiles: str) -> tuple[tuple[frozenset, int], int]:
    tokens = _ATOM_TOKEN.findall(smiles)
    bonds = ("=" in smiles) | ("#" in smiles) << 1 | ("$" in smiles) << 2
    return (frozenset(tokens), bonds), len(tokens)


def _signature(mol: Chem.Mol, smiles: str) -> tuple[frozenset, int] | None:
    """What a molecule is made of, read from its RDKit SMILES (``MolToSmiles(mol)``): the set of
    atom tokens (RDKit writes every atom, aromatic ones in lower case, charges and isotopes in
    brackets) and which bond orders occur (it always writes a double bond '=', a triple '#', a
    quadruple '$'). None, and so no screening, unless there is one token per atom of ``mol``."""
    signature, n_tokens = _smiles_tokens(smiles)
    return signature if n_tokens == mol.GetNumAtoms() else None


def _describe_tree(text: str) -> list:
    """``Atom.DescribeQuery()`` text -> [(name, value, negated, children)], by indentation."""
    rows = []
    for line in text.splitlines():
        if line.strip():
            depth = (len(line) - len(line.lstrip(" "))) // 2
            rows.append((depth, line.strip().split()))

    def build(i: int, depth: int) -> tuple[list, int]:
        nodes = []
        while i < len(rows) and rows[i][0] == depth:
            words = rows[i][1]
            kids, i = build(i + 1, depth + 1)
            value, negated = None, None
            if len(words) == 4 and words[3] == "val" and words[2] in ("=", "!="):
                try:
                    value, negated = int(words[1]), words[2] == "!="
                except ValueError:
                    pass
            nodes.append((words[0], value, negated, kids, len(words)))
        return nodes, i

    return build(0, 0)[0]


def _may_match(node, key) -> bool | None:
    """Three-valued: can this query node match an atom (or bond) with ``key``? True, False, or None
    (unknown: ring membership, H count, recursive SMARTS... are not in the key). Only an answer of
    False is used, so an unknown primitive can only keep a pattern, never drop one."""
    name, value, negated, kids, nwords = node
    if name in ("AtomAnd", "AtomOr", "BondAnd", "BondOr"):
        if nwords != 1 or not kids:
            return None
        results = [_may_match(kid, key) for kid in kids]
        if name.endswith("And"):
            return False if False in results else (True if all(r is True for r in results) else None)
        return True if True in results else (None if None in results else False)
    if name in ("AtomNull", "BondNull") and nwords == 1:
        return True
    if value is None or kids:
        return None
    if name.startswith("Atom"):
        z, aromatic, charge, isotope = key
        if name == "AtomType":
            result = z == value % 1000 and aromatic == (value >= 1000)
        elif name == "AtomAtomicNum":
            result = z == value
        elif name == "AtomFormalCharge":
            result = charge == value
        elif name == "AtomIsotope":
            result = isotope == value
        elif name == "AtomIsAromatic" and value == 1:
            result = aromatic
        elif name == "AtomIsAliphatic" and value == 1:
            result = not aromatic
        else:
            return None
    elif name == "BondOrder" and value in (2, 3, 4):  # key: the bond orders present (bit flags)
        result = bool(key & (1 << (value - 2)))
    else:
        return None
    return result != negated


# Rough share of each atom kind among the atoms of drug-like molecules: only used to choose the
# order in which a pattern's query atoms are tried (rarest first), never to decide a match.
_ATOM_KIND_SHARE = {
    (6, True, 0, 0): 0.36, (6, False, 0, 0): 0.33, (8, False, 0, 0): 0.09, (7, False, 0, 0): 0.07,
    (7, True, 0, 0): 0.07, (9, False, 0, 0): 0.02, (16, False, 0, 0): 0.01, (17, False, 0, 0): 0.01,
    (16, True, 0, 0): 0.005, (8, True, 0, 0): 0.005, (35, False, 0, 0): 0.002, (7, False, 1, 0): 0.003,
    (8, False, -1, 0): 0.003, (7, True, 1, 0): 0.001, (15, False, 0, 0): 0.001, (53, False, 0, 0): 0.001,
}


def _rarest_first(pattern: Chem.Mol) -> Chem.Mol:
    """The same query with its atoms renumbered so that matching starts from its rarest atom and
    grows through its rarest neighbours. RDKit's matcher tries query atoms in index order; whether a
    match exists does not depend on that order, its cost does: ``c1ccccc1OC(=O)O`` walks every
    benzene ring of a molecule before looking for the carbonate, ``O(C(=O)O)c1ccccc1`` fails at once
    (~6 us -> ~1.3 us per molecule). Counting matches or alerts gives the same numbers."""
    atoms = [_describe_tree(a.DescribeQuery())[0] for a in pattern.GetAtoms()]
    score = []
    for atom, node in zip(pattern.GetAtoms(), atoms):
        share = sum(w for key, w in _ATOM_KIND_SHARE.items() if _may_match(node, key) is not False) or 1e-4
        for bond in atom.GetBonds():  # an atom on a double / triple query bond is rarer
            plain = _may_match(_describe_tree(bond.DescribeQuery())[0], 0)  # False: needs '=', '#' or '$'
            share *= 0.3 if plain is False else 1.0
        recursive = "RecursiveStructure" in atom.DescribeQuery()
        score.append((recursive, share, -len(atom.DescribeQuery().splitlines()), atom.GetIdx()))
    order: list[int] = []
    while len(order) < pattern.GetNumAtoms():
        placed = set(order)
        frontier = {n.GetIdx() for i in order for n in pattern.GetAtomWithIdx(i).GetNeighbors()} - placed
        pool = frontier or (set(range(pattern.GetNumAtoms())) - placed)  # next component
        order.append(min(pool, key=lambda i: score[i]))
    return Chem.RenumberAtoms(pattern, order)


class _PatternScreen:
    """Which of a fixed list of SMARTS patterns can match a molecule at all: a pattern is kept
    unless one of its query atoms matches none of the molecule's atom kinds (element, aromaticity,
    charge, isotope) or one of its query bonds needs a bond order the molecule lacks. A necessary
    condition only: the kept patterns are then matched for real, rarest query atom first."""

    def __init__(self, patterns: Sequence[Chem.Mol], reorder: bool = True):
        self.patterns = [_rarest_first(p) for p in patterns] if reorder else list(patterns)
        self._atoms = [[_describe_tree(a.DescribeQuery())[0] for a in p.GetAtoms()] for p in self.patterns]
        self._bonds = [[_describe_tree(b.DescribeQuery())[0] for b in p.GetBonds()] for p in self.patterns]
        self._token_masks: dict[str, int] = {}
        self._kept: dict[tuple[frozenset, int], tuple[int, ...]] = {}

    def _token_mask(self, token: str) -> int:
        """Bit (pattern i, atom j) set where the query atom may match this token's atom."""
        mask = self._token_masks.get(token)
        if mask is None:
            key = _token_key(token)
            mask, bit = 0, 0
            for atoms in self._atoms:
                for node in atoms:
                    if key is None or _may_match(node, key) is not False:
                        mask |= 1 << bit
                    bit += 1
            self._token_masks[token] = mask
        return mask

    def kept(self, signature: tuple[frozenset, int] | None) -> tuple[int, ...]:
        """Indices of the patterns that may match a molecule with this :func:`_signature` (None: all)."""
        if signature is None:
            return tuple(range(len(self.patterns)))
        kept = self._kept.get(signature)
        if kept is None:
            tokens, bonds = signature
            mask = 0
            for token in tokens:
                mask |= self._token_mask(token)
            out, bit = [], 0
            for i, (atoms, bond_nodes) in enumerate(zip(self._atoms, self._bonds)):
                need = ((1 << len(atoms)) - 1) << bit
                bit += len(atoms)
                if mask & need == need and all(_may_match(b, bonds) is not False for b in bond_nodes):
                    out.append(i)
            kept = tuple(out)
            if len(self._kept) < 4096:  # distinct signatures are few (element/charge combinations)
                self._kept[signature] = kept
        return kept


@lru_cache(maxsize=1)
def _alert_screen() -> _PatternScreen:
    return _PatternScreen(QED.StructuralAlerts)


@lru_cache(maxsize=1)
def _acceptor_screen() -> _PatternScreen:
    return _PatternScreen(QED.Acceptors)


# SMARTS that RDKit's descriptor functions count (RDKit 2026.09, Code/GraphMol/Descriptors/Lipinski.cpp).
# RDKit copies a pattern that holds a recursive part ($(...)) on every call, to be safe with threads
# (~25 us for the strict rotor pattern: more than the match itself); we match one compiled copy, as
# RDKit's own QED module does with its recursive patterns. Same count: checked at first use on
# _PANEL against RDKit's functions (any difference: RDKit's function, always) and by the tests.
_STRICT_ROTOR = (
    "[!$(*#*)&!D1&!$(C(F)(F)F)&!$(C(Cl)(Cl)Cl)&!$(C(Br)(Br)Br)&!$(C([CH3])([CH3])[CH3])&!$([CH3])"
    "&!$([CD3](=[N,O,S])-!@[#7,O,S!D1])&!$([#7,O,S!D1]-!@[CD3]=[N,O,S])&!$([CD3](=[N+])-!@[#7!D1])"
    "&!$([#7!D1]-!@[CD3]=[N+])]-,:;!@[!$(*#*)&!D1&!$(C(F)(F)F)&!$(C(Cl)(Cl)Cl)&!$(C(Br)(Br)Br)"
    "&!$(C([CH3])([CH3])[CH3])&!$([CH3])]")
_LIPINSKI_HBA = ("[$([O,S;H1;v2]-[!$(*=[O,N,P,S])]),$([O,S;H0;v2]),$([O,S;-]),$([N;v3;!$(N-*=!@[O,N,P,S])]),"
                 "$([nH0X2,o,s;+0])]")
# Molecules that exercise every branch of those patterns and of Crippen's hydrogen types.
_PANEL = (
    "CC(=O)Oc1ccccc1C(=O)O", "CN1CCN(Cc2ccc(cc2)C(=O)Nc2ccc(C)c(Nc3nccc(n3)-c3cccnc3)c2)CC1", "OCC(O)CO",
    "C=CC(=O)OC", "OC(=O)C=Cc1ccccc1", "NC(=N)NCCC[C@H](N)C(=O)O", "C[N+](C)(C)CCOC(C)=O",
    "[O-][N+](=O)c1ccc(O)cc1", "FC(F)(F)c1ccc(Cl)cc1Br", "CC(C)(C)OC(=O)NCC#N", "OS(=O)(=O)c1ccccc1",
    "OP(=O)(O)OCC", "OB(O)c1ccccc1", "CSc1ncccn1", "O=C1NC(=O)c2ccccc21", "CC(=O)NO", "OO", "O", "N", "C#CCO",
    "NC(=[NH2+])c1ccccc1", "CC(=S)NCC", "c1ccc2[nH]ccc2c1", "Oc1ccc(I)cc1", "NC1CC1", "[Na+].[O-]C(=O)c1ccccc1",
    "CC(C)(C)c1ccccc1CCl", "ClC(Cl)(Cl)C(O)O", "OC1=CC(=O)C=C1", "C[Si](C)(C)O", "[NH3+]CC(=O)[O-]",
    "O=[N+]([O-])CCS", "CCOC(=O)C(C)(C)C", "BrC(Br)(Br)CCN=C(N)N", "c1ccoc1CN=CC", "OC=CC(=O)c1ccsc1",
)


@lru_cache(maxsize=1)
def _fast_counts() -> dict:
    """The compiled count patterns, each kept only if it gives RDKit's number on every _PANEL molecule."""
    strict = rdmd.NumRotatableBondsOptions.Strict
    checks = {"rotb": (_STRICT_ROTOR, lambda m: rdmd.CalcNumRotatableBonds(m, strict)),
              "hba": (_LIPINSKI_HBA, rdmd.CalcNumHBA)}
    mols = [Chem.MolFromSmiles(s) for s in _PANEL]
    out = {}
    for name, (smarts, rdkit_count) in checks.items():
        query = Chem.MolFromSmarts(smarts)
        if query is not None and all(len(m.GetSubstructMatches(query)) == rdkit_count(m) for m in mols):
            out[name] = query
    return out


def _rotatable_bonds(mol: Chem.Mol) -> int:
    """``CalcNumRotatableBonds(mol, Strict)`` (~45 us) as one match count (~20 us)."""
    query = _fast_counts().get("rotb")
    if query is None:
        return rdmd.CalcNumRotatableBonds(mol, rdmd.NumRotatableBondsOptions.Strict)
    return len(mol.GetSubstructMatches(query))  # RDKit's count: uniquified, at most 1000, as here


def _lipinski_hba(mol: Chem.Mol) -> int:
    """``CalcNumHBA(mol)`` (~21 us) as one match count (~13 us)."""
    query = _fast_counts().get("hba")
    return rdmd.CalcNumHBA(mol) if query is None else len(mol.GetSubstructMatches(query))


@lru_cache(maxsize=1)
def _crippen_h_logp() -> dict[str, float]:
    """LogP contributions of Crippen's hydrogen types, read from RDKit itself on tiny molecules."""
    out: dict[str, float] = {}
    for smiles in ("C", "S", "N", "OC=O", "[OH-]"):
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        labels = [""] * mol.GetNumAtoms()
        contribs = rdmd._CalcCrippenContribs(mol, True, [0] * mol.GetNumAtoms(), labels)
        out.update((label, logp) for (logp, _mr), label in zip(contribs, labels) if label.startswith("H"))
    return out


@lru_cache(maxsize=1)
def _crippen_heavy() -> tuple[_PatternScreen, list[float]] | None:
    """Crippen's heavy-atom types (RDKit's data file, the same table as its C++ code, in order) as
    a pattern screen, so that an atom type whose first atom is absent (e.g. every S, Cl or charged-N
    type for most drugs) is not searched for: ~47 of ~90 searches on a drug-like molecule. None
    (RDKit's C++ typing is used) if the file is missing or the result differs on any _PANEL molecule."""
    try:
        from rdkit import RDConfig

        with open(f"{RDConfig.RDDataDir}/Crippen.txt") as handle:
            rows = [line.rstrip("\n").split("\t") for line in handle if line.strip() and not line.startswith("#")]
        params = [(Chem.MolFromSmarts(r[1]), float(r[2]) if r[2] else 0.0) for r in rows if not r[1].startswith("[#1]")]
    except (OSError, IndexError, ValueError):
        return None
    if any(q is None for q, _ in params):
        return None
    typer = (_PatternScreen([q for q, _ in params], reorder=False), [logp for _, logp in params])
    for smiles in _PANEL:
        mol = Chem.MolFromSmiles(smiles)
        expected = [logp for logp, _mr in rdmd._CalcCrippenContribs(Chem.Mol(mol))]
        if _heavy_logp_contribs(mol, _signature(mol, Chem.MolToSmiles(mol)), typer) != expected:
            return None
    return typer


def _heavy_logp_contribs(mol: Chem.Mol, signature, typer) -> list[float]:
    """RDKit's getCrippenAtomContribs for heavy atoms: each pattern in order, every (non-unique, at
    most 1000, as RDKit asks) match types its first atom if still untyped; stop once all are typed."""
    screen, logps = typer
    contribs: list[float | None] = [None] * mol.GetNumAtoms()
    left = len(contribs)
    for i in screen.kept(signature):
        for match in mol.GetSubstructMatches(screen.patterns[i], False, False, False, 1000):
            if contribs[match[0]] is None:
                contribs[match[0]] = logps[i]
                left -= 1
        if not left:
            break
    return [0.0 if c is None else c for c in contribs]  # untyped: 0, as RDKit's zero-filled vector


_HAS_H = Chem.MolFromSmarts("[!H0]")
_SINGLE_OR_AROMATIC = (Chem.BondType.SINGLE, Chem.BondType.AROMATIC)


def _hydroxyl_h_type(oxygen: Chem.Atom, n_h: int) -> str:
    """Crippen type of a hydrogen on an aliphatic oxygen: RDKit's H patterns in RDKit's order
    (H2 ``[#1]O[CX4,c]``, ``[#1]O[!#6;!#7;!#8;!#16]``; H3 ``[#1]O[#7]``; H4 ``[#1]OC=[#6,#7,O,S]``,
    ``[#1]O[O,S]``; else HS), the O's other neighbours taken over single or aromatic bonds."""
    if n_h > 1:  # the other H is a neighbour matching [!#6;!#7;!#8;!#16]
        return "H2"
    others = [b.GetOtherAtom(oxygen) for b in oxygen.GetBonds() if b.GetBondType() in _SINGLE_OR_AROMATIC]
    if any(x.GetAtomicNum() == 6 and (x.GetIsAromatic() or x.GetTotalDegree() == 4) for x in others):
        return "H2"
    if any(x.GetAtomicNum() not in (6, 7, 8, 16) for x in others):
        return "H2"
    if any(x.GetAtomicNum() == 7 for x in others):
        return "H3"
    for x in others:
        if x.GetAtomicNum() == 6 and not x.GetIsAromatic():
            for bond in x.GetBonds():
                if bond.GetBondType() == Chem.BondType.DOUBLE:
                    y = bond.GetOtherAtom(x)
                    if y.GetAtomicNum() in (6, 7) or (y.GetAtomicNum() in (8, 16) and not y.GetIsAromatic()):
                        return "H4"
    if any(x.GetAtomicNum() in (8, 16) and not x.GetIsAromatic() for x in others):
        return "H4"
    return "HS"


def crippen_logp(mol: Chem.Mol, smiles: str | None = None) -> float:
    """Wildman-Crippen LogP, bit-identical to ``Crippen.MolLogP`` at ~55% of its cost.

    RDKit copies the molecule with explicit hydrogens (``AddHs``) and runs its ~110 atom-type
    patterns over twice the atoms. Its heavy-atom patterns read hydrogens only through the H and X
    counts and never match a hydrogen as a neighbour, so they type heavy atoms identically on the
    molecule as given; a hydrogen's type depends only on the atom that carries it (and, on an
    oxygen, that oxygen's neighbours). With ``smiles`` (the molecule's RDKit SMILES) heavy-atom
    types whose first atom is absent are skipped (:func:`_crippen_heavy`). The sum runs in RDKit's
    order (heavy atoms, then each atom's hydrogens in atom order), so even the last bit agrees.
    Explicit hydrogen or dummy atoms, or a hydrogen on an aromatic oxygen: RDKit's own function.
    """
    if mol.GetNumAtoms() != mol.GetNumHeavyAtoms():
        return Crippen.MolLogP(mol)
    h_logp = _crippen_h_logp()
    typer = _crippen_heavy() if smiles is not None else None
    if typer is not None:
        heavy = _heavy_logp_contribs(mol, _signature(mol, smiles), typer)
    else:
        heavy = [logp for logp, _mr in rdmd._CalcCrippenContribs(mol)]
    h_terms: list[tuple[int, int, float]] = []
    for (idx,) in mol.GetSubstructMatches(_HAS_H, True, False, False, mol.GetNumAtoms()):
        atom = mol.GetAtomWithIdx(idx)
        z, n_h = atom.GetAtomicNum(), atom.GetTotalNumHs()
        if z == 6:
            label = "H1"
        elif z == 7:
            label = "H3"
        elif z == 8:
            if atom.GetIsAromatic():
                return Crippen.MolLogP(mol)
            label = _hydroxyl_h_type(atom, n_h)
        else:  # [#1][!#6;!#7;!#8]
            label = "H2"
        h_terms.append((idx, n_h, h_logp[label]))
    logp = 0.0
    for contrib in heavy:  # sequential, as RDKit sums (no fsum, no pairwise sum())
        logp += contrib
    for _idx, n_h, contrib in sorted(h_terms):
        for _ in range(n_h):
            logp += contrib
    return logp


def _qed_properties(mol: Chem.Mol, known: dict | None = None, smiles: str | None = None) -> QED.QEDproperties:
    """``QED.properties`` with the same numbers. ``known`` (mw, logp, hbd, tpsa, rotb of this very
    molecule) skips recomputing; ``smiles`` (its RDKit SMILES) feeds the pattern screens."""
    return _qed_properties_many([mol], [known], [smiles])[0]


def _qed_properties_many(mols: Sequence[Chem.Mol], knowns: Sequence[dict | None],
                         smiles: Sequence[str | None]) -> list[QED.QEDproperties]:
    """:func:`_qed_properties` for several molecules, one stage at a time (see _describe_mols)."""
    mols, knowns, smiles = list(mols), list(knowns), list(smiles)
    for i, mol in enumerate(mols):
        if mol.GetNumAtoms() != mol.GetNumHeavyAtoms():  # QED works on the molecule without H atoms
            with rdBase.BlockLogs():  # "not removing hydrogen atom without neighbors" is no news to the user
                mols[i] = Chem.RemoveHs(mol)
            knowns[i] = smiles[i] = None
        if smiles[i] is None:
            smiles[i] = Chem.MolToSmiles(mols[i])
        if knowns[i] is None:
            mol, text = mols[i], smiles[i]
            knowns[i] = {"mw": rdmd._CalcMolWt(mol), "logp": crippen_logp(mol, text), "hbd": rdmd.CalcNumHBD(mol),
                         "tpsa": rdmd.CalcTPSA(mol), "rotb": _rotatable_bonds(mol)}
    signatures = [_signature(m, s) for m, s in zip(mols, smiles)]
    # AROM: deleting atoms cannot create rings, so no ring means 0. DeleteSubstructs returns a new
    # molecule (QED copies first for nothing); GetSSSR resets the ring info of that copy only.
    arom = [len(Chem.GetSSSR(Chem.DeleteSubstructs(m, QED.AliphaticRings))) if m.GetRingInfo().NumRings() else 0
            for m in mols]
    acceptors = _acceptor_screen()
    # QED: sum(len(GetSubstructMatches(p)) for p if HasSubstructMatch(p)); no match adds 0 anyway
    hba = [sum(len(m.GetSubstructMatches(acceptors.patterns[i])) for i in acceptors.kept(sig))
           for m, sig in zip(mols, signatures)]
    alerts = _alert_screen()
    # one C++ FilterCatalog call over all 116 would be ~20% slower: it collects every match
    n_alerts = [sum(1 for i in alerts.kept(sig) if m.HasSubstructMatch(alerts.patterns[i]))
                for m, sig in zip(mols, signatures)]
    return [QED.QEDproperties(MW=k["mw"], ALOGP=k["logp"], HBA=a, HBD=k["hbd"], PSA=k["tpsa"], ROTB=k["rotb"],
                              AROM=r, ALERTS=n)
            for k, a, r, n in zip(knowns, hba, arom, n_alerts)]


def qed(mol: Chem.Mol) -> float:
    """Quantitative estimate of drug-likeness (Bickerton 2012, RDKit's mean weights); equals
    ``QED.qed(mol)``."""
    return QED.qed(mol, qedProperties=_qed_properties(mol))


def _inchikey(mol: Chem.Mol) -> tuple[str | None, str | None]:
    """(InChIKey, warning). rdinchi returns InChI's message instead of logging it. (InChI options
    do not help: '/AuxNone' and friends save < 3% and anything else changes the standard key.)"""
    inchi, retcode, message, _log, _aux = rdinchi.MolToInchi(mol)
    if not inchi:
        return None, f"no InChIKey: {message or 'InChI generation failed'}"
    return rdinchi.InchiToInchiKey(inchi), (f"InChI: {message}" if retcode and message else None)


DETAILS = ("full", "basic")


def _check_detail(detail: str) -> None:
    if detail not in DETAILS:
        raise InvalidInputError(detail, "unknown detail level",
                                hint="'full' (every descriptor) or 'basic' (without QED and InChIKey)")


def describe_molecule(mol: Chem.Mol, warnings: list[str] | None = None, *, detail: Detail = "full") -> dict:
    """RDKit descriptors of one parsed molecule.

    HBD/HBA are RDKit's pharmacophore counts (``CalcNumHBD``/``CalcNumHBA``), also used for the
    Lipinski rule of five: MW <= 500, LogP <= 5, HBD <= 5, HBA <= 10; ``lipinski_pass`` allows at
    most one violation (Lipinski 1997). InChI messages (e.g. undefined stereo) go to ``warnings``.

    ``detail="basic"`` leaves out the two costliest entries, ``inchikey`` (InChI) and ``qed``, and
    with them InChI's warnings; every other value is the same.
    """
    _check_detail(detail)
    [(desc, found)] = _describe_mols([mol], detail)
    if warnings is not None:
        warnings.extend(found)
    return desc


def _describe_mols(mols: Sequence[Chem.Mol], detail: Detail) -> list[tuple[dict, list[str]]]:
    """describe_molecule for several molecules, one stage at a time over all of them: running the
    same RDKit routine over a run of molecules keeps its code and data in the CPU caches, ~25% less
    CPU than describing molecule after molecule (each one walking through the SMILES writer, the
    pattern matcher, InChI... in turn). Same values, same order of computation per molecule."""
    full = detail == "full"
    smiles = [Chem.MolToSmiles(m) for m in mols]
    mw = [rdmd._CalcMolWt(m) for m in mols]
    logp = [crippen_logp(m, s) for m, s in zip(mols, smiles)]
    hbd = [rdmd.CalcNumHBD(m) for m in mols]
    hba = [_lipinski_hba(m) for m in mols]
    rotb = [_rotatable_bonds(m) for m in mols]
    tpsa = [rdmd.CalcTPSA(m) for m in mols]
    formula = [rdmd.CalcMolFormula(m) for m in mols]
    aromatic = [rdmd.CalcNumAromaticRings(m) for m in mols]
    inchi = [_inchikey(m) for m in mols] if full else None
    qeds = None
    if full:
        known = [{"mw": a, "logp": b, "hbd": c, "tpsa": d, "rotb": e}
                 for a, b, c, d, e in zip(mw, logp, hbd, tpsa, rotb)]
        qeds = [QED.qed(m, qedProperties=props) for m, props in zip(mols, _qed_properties_many(mols, known, smiles))]
    out = []
    for i, mol in enumerate(mols):
        violations = int(mw[i] > 500) + int(logp[i] > 5) + int(hbd[i] > 5) + int(hba[i] > 10)
        desc = {"canonical_smiles": smiles[i]}
        warnings = []
        if full:
            inchikey, warning = inchi[i]
            if warning:
                warnings.append(warning)
            desc["inchikey"] = inchikey
        desc.update({
            "formula": formula[i],
            "mw": round(mw[i], 4),
            "logp": round(logp[i], 4),
            "tpsa": round(tpsa[i], 4),
            "hbd": hbd[i],
            "hba": hba[i],
            "rotatable_bonds": rotb[i],
            "aromatic_rings": aromatic[i],
            "heavy_atoms": mol.GetNumHeavyAtoms(),
            "fragments": smiles[i].count(".") + 1,  # RDKit writes each disconnected fragment once, '.'-joined
        })
        if full:
            desc["qed"] = round(qeds[i], 4)
        desc["lipinski_violations"] = violations
        desc["lipinski_pass"] = violations <= 1
        out.append((desc, warnings))
    return out


# ---------------------------------------------------------------------------------------------
# Fingerprints and similarity (used by probe diversity sampling and k-shot retrieval)
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _morgan_generator(radius: int, n_bits: int):
    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)


def _as_mol(item: str | Chem.Mol, index: int | None = None) -> Chem.Mol:
    if isinstance(item, Chem.Mol):
        return item
    try:
        return parse_molecule(item)
    except InvalidInputError as exc:
        raise InvalidInputError(item, exc.reason, exc.hint, index) from None


def morgan_fingerprint(smiles_or_mol: str | Chem.Mol, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP-like) bit vector as ``uint8`` 0/1, shape ``[n_bits]``."""
    return _morgan_generator(radius, n_bits).GetFingerprintAsNumPy(_as_mol(smiles_or_mol)).astype(np.uint8, copy=False)


def morgan_fingerprints(items: Sequence[str | Chem.Mol], radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """``uint8[N, n_bits]``. An invalid item raises, naming its index (callers inspect first)."""
    gen = _morgan_generator(radius, n_bits)
    out = np.zeros((len(items), n_bits), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = gen.GetFingerprintAsNumPy(_as_mol(item, i))
    return out


def _fp_array(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return morgan_fingerprint(x)


def tanimoto(a, b) -> float:
    """Tanimoto similarity of two fingerprints (arrays, SMILES or Mols). Two empty fingerprints
    share nothing: 0.0."""
    fa, fb = _fp_array(a).astype(bool), _fp_array(b).astype(bool)
    union = int(np.count_nonzero(fa | fb))
    return float(np.count_nonzero(fa & fb)) / union if union else 0.0


def tanimoto_matrix(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``float32[N, M]`` pairwise Tanimoto between fingerprint rows of ``a`` and ``b`` (default ``a``).
    Counts are exact in float32 up to 2^24 bits, far above any fingerprint size."""
    fa = np.asarray(a, dtype=np.float32)
    fb = fa if b is None else np.asarray(b, dtype=np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return sim.astype(np.float32)


class _DescriptorCache:
    """LRU of (stripped SMILES, detail) -> (descriptors, warnings): screens and probes repeat the
    same few hundred drugs across thousands of rows (8192 entries, ~2 kB each). Invalid SMILES are
    not cached. (An OrderedDict rather than functools.lru_cache: a batch looks entries up first and
    describes its misses together.)"""

    def __init__(self, maxsize: int = 8192):
        self.maxsize = maxsize
        self._data: OrderedDict[tuple[str, str], tuple[dict, tuple[str, ...]]] = OrderedDict()
        self._lock = threading.Lock()  # server threads may inspect at the same time

    def get(self, key: tuple[str, str]) -> tuple[dict, tuple[str, ...]] | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: tuple[dict, tuple[str, ...]]) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def cache_clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_CACHE = _DescriptorCache()
_CHUNK = 64  # molecules described stage by stage at a time (see _describe_mols)


def _with_fragment_warning(desc: dict, warnings: list[str]) -> tuple[dict, tuple[str, ...]]:
    if desc["fragments"] > 1:
        warnings.append(f"{desc['fragments']} disconnected fragments (salt or mixture?): "
                        "descriptors describe the whole input")
    return desc, tuple(warnings)


def _describe_text(text: str, detail: Detail = "full") -> tuple[dict, tuple[str, ...]]:
    """Descriptors of one stripped SMILES, cached. Invalid SMILES raise, uncached."""
    hit = _CACHE.get((text, detail))
    if hit is None:
        mol = parse_molecule(text, max_length=len(text))
        hit = _with_fragment_warning(*_describe_mols([mol], detail)[0])
        _CACHE.put((text, detail), hit)
    return hit


_describe_text.cache_clear = _CACHE.cache_clear  # type: ignore[attr-defined]  # the bench empties it


def inspect_molecules(smiles_list: Iterable[str], *, max_length: int = 2000, max_items: int = 10000,
                      detail: Detail = "full") -> list[ItemResult]:
    """Validate and describe each SMILES on its own; one :class:`ItemResult` per item, in order.

    ``detail="full"`` (default): every descriptor. ``"basic"``: the same without ``qed`` and
    ``inchikey`` (and InChI's warnings), about twice as fast on new molecules. New molecules are
    described together, stage by stage, in runs of ``_CHUNK``; repeated SMILES come from a cache.

    Throughput on one core (CPU time, generated drug-like SMILES, RDKit 2026.09, ``es-merging bench
    inspect``): full ~1,350 SMILES/s, basic ~2,900 SMILES/s; real drugs (Davis + GDSC2, ~32 heavy
    atoms) ~1,100 and ~2,400.
    """
    _check_detail(detail)
    items = check_batch(smiles_list, max_items, "SMILES strings")
    results: list[ItemResult | None] = [None] * len(items)
    described: dict[str, tuple[dict, tuple[str, ...]]] = {}
    todo: dict[str, list[int]] = {}  # new SMILES -> the positions that carry it
    for i, smiles in enumerate(items):
        try:
            if not isinstance(smiles, str) or len(smiles.strip()) > max_length:
                parse_molecule(smiles, max_length=max_length)  # raises; keeps huge keys out of the cache
        except InvalidInputError as exc:
            results[i] = error_result(i, smiles, exc)
            continue
        text = smiles.strip()
        hit = described.get(text) or _CACHE.get((text, detail))
        if hit is not None:
            described[text] = hit
        else:
            todo.setdefault(text, []).append(i)
    texts = list(todo)
    for start in range(0, len(texts), _CHUNK):
        chunk, mols = [], []
        for text in texts[start:start + _CHUNK]:
            try:
                mols.append(parse_molecule(text, max_length=len(text)))
                chunk.append(text)
            except InvalidInputError as exc:
                for i in todo[text]:
                    results[i] = error_result(i, items[i], exc)
        for text, (desc, warnings) in zip(chunk, _describe_mols(mols, detail)):
            described[text] = _with_fragment_warning(desc, warnings)
            _CACHE.put((text, detail), described[text])
    for i, smiles in enumerate(items):
        if results[i] is None:
            desc, warnings = described[smiles.strip()]
            results[i] = ItemResult(index=i, input=display(smiles), ok=True, warnings=list(warnings),
                                    descriptors=dict(desc))
    return results
