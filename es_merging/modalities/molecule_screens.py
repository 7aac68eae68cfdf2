"""Pattern screens for the molecule fast paths: which SMARTS patterns can match a molecule at all.

RDKit's descriptor functions (Crippen LogP, QED's alerts and acceptors, the strict rotatable-bond and
Lipinski HBA counts) search a fixed list of SMARTS patterns in every molecule; most of them cannot
match a given molecule (no S, no charged N, no triple bond...), yet each search costs ~1-3 us. The
screens here decide, from what a molecule is made of, which patterns need no search because they
cannot match: a necessary condition only, never a decision that a pattern does match, so every
count the fast paths (:mod:`es_merging.modalities.molecule_fast`) make stays RDKit's own.

* :func:`_signature`: the set of atom tokens and bond orders of a molecule's RDKit SMILES;
  :class:`_PatternScreen` screens one pattern list with it.
* :class:`_Facts`: per atom a code (kind, explicit degree, H count, ring count) and per bond the
  pair of codes with its type; :class:`_RichScreen` screens every list at once with them.
* The screened lists: QED's alerts and acceptors, Crippen's heavy-atom types (:func:`_crippen_heavy`),
  the strict rotor's recursive conditions (:func:`_rotor_parts`), the HBA pattern's alternatives
  (:func:`_hba_parts`); each compiled pattern is checked at first use against RDKit's own function
  on :data:`_PANEL` (any difference: that fast route is off, RDKit's function is used).
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Sequence

import numpy as np
from rdkit import Chem
from rdkit.Chem import QED
from rdkit.Chem import rdMolDescriptors as rdmd

_ATOM_TOKEN = re.compile(r"\[[^\]]+\]|Br|Cl|[BCNOPSFI]|[bcnops]|\*")


@lru_cache(maxsize=4096)
def _token_key(token: str) -> tuple[int, bool, int, int] | None:
    """(atomic number, aromatic, formal charge, isotope) of one SMILES atom token; None if RDKit
    cannot read the token alone (the screen then keeps every pattern)."""
    atom = Chem.AtomFromSmiles(token)
    if atom is None:
        return None
    return atom.GetAtomicNum(), atom.GetIsAromatic(), atom.GetFormalCharge(), atom.GetIsotope()


@lru_cache(maxsize=256)  # asked several times per molecule (LogP, rotatable bonds, _Facts, QED)
def _smiles_tokens(smiles: str) -> tuple[tuple[frozenset, int], list[str]]:
    tokens = _ATOM_TOKEN.findall(smiles)
    bonds = ("=" in smiles) | ("#" in smiles) << 1 | ("$" in smiles) << 2
    return (frozenset(tokens), bonds), tokens


def _signature(mol: Chem.Mol, smiles: str) -> tuple[frozenset, int] | None:
    """What a molecule is made of, read from its RDKit SMILES (``MolToSmiles(mol)``): the set of
    atom tokens (RDKit writes every atom, aromatic ones in lower case, charges and isotopes in
    brackets) and which bond orders occur (it always writes a double bond '=', a triple '#', a
    quadruple '$'). None, and so no screening, unless there is one token per atom of ``mol``."""
    signature, tokens = _smiles_tokens(smiles)
    return signature if len(tokens) == mol.GetNumAtoms() else None


# Atom kinds as small integers (one per distinct key of _token_key), so that what a molecule is made
# of is a set of ints. Grows with the distinct atom tokens seen (a few dozen).
_KIND_OF_TOKEN: dict[str, int] = {}
_KIND_KEYS: list[tuple[int, bool, int, int]] = []
_KIND_LOCK = threading.Lock()
# Bond orders as getBondTypeAsDouble gives them -> RDKit's BondType values (what BondOrder queries test)
_BOND_TYPE_OF_ORDER = {1.0: 1, 2.0: 2, 3.0: 3, 4.0: 4, 1.5: 12}
_ODD_BOND = re.compile(r"[~<>]")  # RDKit writes a dative bond '->' or '<-', any unusual bond type '~'
_HAS_H = Chem.MolFromSmarts("[!H0]")
# H counts in 2 or 3 searches: 1 and 3 set bit 1, 2 and 3 set bit 2; 4 or more asked atom by atom,
# and only searched for where the SMILES may hold such an atom (see _may_have_four_h)
_H_COUNTS = [(Chem.MolFromSmarts(q), bit) for q, bit in (("[H1,H3]", 1), ("[H2,H3]", 2), ("[!H0;!H1;!H2;!H3]", 4))]
_FOUR_H_IN_BRACKETS = re.compile(r"\[[^\]]*H(?:[4-9]|\d\d)")


def _may_have_four_h(smiles: str) -> bool:
    """Whether an atom of the molecule RDKit wrote as ``smiles`` may carry 4 or more hydrogens. An
    atom written without brackets has the hydrogens its element's default valence leaves (B 3, C 4,
    N 3, O 2, P 3, S 2, halogens 1, less its bonds): 4 only for a carbon with no bond, which RDKit
    writes as a fragment "C" of its own (methane). Any other atom with 4 or more is written in
    brackets with its count: [NH4+], [SiH4]."""
    return bool(_FOUR_H_IN_BRACKETS.search(smiles)) or "C" in smiles.split(".")
_MANY = 15  # degrees, H counts and ring counts are kept in 4 bits: 15 stands for "15 or more"


def _match_parameters(uniquify: bool = True, max_matches: int = 1000) -> Chem.SubstructMatchParameters:
    """Search settings made once: passing them saves building them from keyword defaults on every
    call (~0.2-1 us a search, ~30 searches a molecule). Otherwise RDKit's defaults, as the plain
    GetSubstructMatches / HasSubstructMatch calls use them (tested: same matches)."""
    params = Chem.SubstructMatchParameters()
    params.uniquify, params.maxMatches = uniquify, max_matches
    return params


_EVERY_ATOM = _match_parameters(uniquify=False, max_matches=2**31 - 1)  # one-atom queries: every matching atom
_NON_UNIQUE = _match_parameters(uniquify=False)  # as RDKit's Crippen typing asks: every match, at most 1000
_UNIQUE = _match_parameters()  # GetSubstructMatches(query): uniquified, at most 1000
_ANY = _match_parameters(max_matches=1)  # HasSubstructMatch(query)


def _kind(token: str) -> int | None:
    kind = _KIND_OF_TOKEN.get(token)
    if kind is None:
        key = _token_key(token)
        if key is None:
            return None
        with _KIND_LOCK:
            kind = _KIND_OF_TOKEN.get(token)
            if kind is None:
                if key not in _KIND_KEYS:
                    if len(_KIND_KEYS) >= 0xFFF:  # an atom code holds 12 bits of kind
                        return None
                    _KIND_KEYS.append(key)
                kind = _KIND_OF_TOKEN[token] = _KIND_KEYS.index(key)
    return kind


def _atom_key(code: int) -> tuple:
    """The :func:`_may_match` key of an atom code (see _Facts): kind, explicit degree, H count and
    number of rings, each count None where it is _MANY (15 or more: not known exactly)."""
    degree, hs, rings = (code >> 8) & 15, (code >> 4) & 15, code & 15
    return _KIND_KEYS[code >> 12] + tuple(None if n == _MANY else n for n in (degree, hs, rings))


class _Facts:
    """What one molecule is made of, for the pattern screens (:class:`_RichScreen`), read right
    after ``MolToSmiles(mol)`` wrote ``smiles`` (RDKit records the atom order of the string):

    * ``codes``: per atom, ``kind << 12 | degree << 8 | H count << 4 | rings``: its kind (from its
      SMILES token: element, aromaticity, charge, isotope), explicit degree (bonds), total H count
      and the number of (SSSR) rings it is in (``rings=False``: not read, 15 = unknown);
    * ``pairs``: per bond, ``lower code << 32 | bond type << 24 | higher code`` (see :meth:`unpair`);
    * ``hs``: atom index -> H count, for the atoms that carry hydrogens (Crippen's H types);
    * ``edges``: both ends of every bond (QED's aromatic ring count), ``orders`` its bond type;
    * ``atom_keys``: left to :func:`~es_merging.modalities.molecule_atom_memo.atom_keys` to fill.

    ``codes`` is None (and the screens fall back to the SMILES signature) when this cannot be read
    with certainty: explicit hydrogen atoms, a dative or unusual bond, an atom token RDKit cannot
    read alone, a SMILES that is not this molecule's. The H counts are read with RDKit's own H query
    primitive (2 searches, 3 where an atom may carry 4 or more), the ring counts from the RingInfo its R primitive reads (atom by atom:
    ~3 us, where searching [R] and [!R0;!R1] took ~8), the bonds from its adjacency matrix."""

    __slots__ = ("codes", "pairs", "hs", "edges", "orders", "atom_keys", "_kept", "_guards")

    def __init__(self, mol: Chem.Mol, smiles: str, rings: bool = True):
        self.codes: list[int] | None = None
        self.pairs: frozenset[int] = frozenset()
        self.hs: dict[int, int] = {}
        self.edges: tuple[list[int], list[int]] = ([], [])
        self.orders: list[int] = []  # RDKit's BondType value of each bond in edges (1, 2, 3, 4, 12)
        self.atom_keys: list[int] | None | bool = False  # key ids; False: not computed yet
        self._kept: dict | None = None
        n = mol.GetNumAtoms()
        if not n or n != mol.GetNumHeavyAtoms() or _ODD_BOND.search(smiles):
            return
        try:
            order = mol.GetProp("_smilesAtomOutputOrder").strip("[],").split(",")  # "[2,0,1]" (older RDKit: "[2,0,1,]")
        except KeyError:
            return
        tokens = _smiles_tokens(smiles)[1]
        if len(tokens) != n or len(order) != n:
            return
        kind_of = _KIND_OF_TOKEN
        try:
            by_token = [kind_of[token] << 12 for token in tokens]
        except KeyError:
            by_token = [_kind(token) for token in tokens]
            if None in by_token:
                return
            by_token = [kind << 12 for kind in by_token]
        adjacency = Chem.GetAdjacencyMatrix(mol, useBO=True)
        rows, cols = adjacency.nonzero()  # each bond twice, with its order (0: dative, zero-order...)
        if len(rows) != 2 * mol.GetNumBonds():
            return
        upper = rows < cols
        begins, ends = rows[upper], cols[upper]
        type_of = _BOND_TYPE_OF_ORDER
        orders = [type_of.get(order, 0) for order in adjacency[begins, ends].tolist()]
        if 0 in orders:
            return
        bond_types = [order << 24 for order in orders]
        hs: dict[int, int] = {}  # what RDKit's H primitive counts, atom by atom
        get = hs.get
        for query, bit in _H_COUNTS if _may_have_four_h(smiles) else _H_COUNTS[:2]:
            for (idx,) in mol.GetSubstructMatches(query, _EVERY_ATOM):
                hs[idx] = get(idx, 0) | bit if bit < 4 else mol.GetAtomWithIdx(idx).GetTotalNumHs()
        codes = [0] * n
        for idx, kind in zip(map(int, order), by_token):
            codes[idx] = kind
        for idx, count in hs.items():
            codes[idx] |= (count if count < _MANY else _MANY) << 4
        degrees = np.bincount(rows, minlength=n).tolist()
        ring_info = mol.GetRingInfo()
        if not rings:
            codes = [code | (d if d < _MANY else _MANY) << 8 | _MANY for code, d in zip(codes, degrees)]
        elif ring_info.NumRings():  # RDKit's R primitive: RingInfo.numAtomRings, the number of (SSSR) rings
            count = ring_info.NumAtomRings  # asked atom by atom: cheaper than searching [R] and [!R0;!R1]
            codes = [code | (d if d < _MANY else _MANY) << 8 | (r if r < _MANY else _MANY)
                     for code, d, r in zip(codes, degrees, map(count, range(n)))]
        else:
            codes = [code | (d if d < _MANY else _MANY) << 8 for code, d in zip(codes, degrees)]
        begins, ends = begins.tolist(), ends.tolist()
        pairs = set()
        add = pairs.add
        for a, b, bond_type in zip(begins, ends, bond_types):
            a, b = codes[a], codes[b]
            add(a << 32 | bond_type | b if a <= b else b << 32 | bond_type | a)
        self.codes, self.pairs, self.hs, self.edges, self.orders = codes, frozenset(pairs), hs, (begins, ends), orders

    @staticmethod
    def unpair(pair: int) -> tuple[int, int, int]:
        return pair >> 32, (pair >> 24) & 0xFF, pair & 0xFFFFFF

    def kept(self, screen: "_PatternScreen") -> tuple[int, ...] | None:
        """The patterns of ``screen`` that may match this molecule (None: no facts, screen by the
        SMILES signature)."""
        if self.codes is None:
            return None
        kept = self._kept
        if kept is None:  # every screen's guards at once; each screen's patterns decoded when asked
            kept = self._kept = {}
            rich = _rich_screen()
            self._guards = (rich, rich.guards_kept(self))
        found = kept.get(screen, False)
        if found is False:
            rich, guards = self._guards
            found = kept[screen] = rich.decode(guards, screen)
        return found


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
            nodes.append((words[0], value, negated, tuple(kids), len(words)))  # hashable
        return nodes, i

    return build(0, 0)[0]


def _recursions(smarts: str) -> list[tuple[bool, str]] | None:
    """The recursive parts of one atom's SMARTS, in order: (negated, inner SMARTS) for each
    ``$(...)`` / ``!$(...)`` (one nested in another is part of the outer one's text); None if a
    parenthesis is left open."""
    out, i = [], 0
    while i < len(smarts):
        if not smarts.startswith("$(", i):
            i += 1
            continue
        j, level = i + 2, 1
        while j < len(smarts) and level:
            level += {"(": 1, ")": -1}.get(smarts[j], 0)
            j += 1
        if level:
            return None
        out.append((i > 0 and smarts[i - 1] == "!", smarts[i + 2:j - 1]))
        i = j
    return out


def _atom_tree(atom: Chem.Atom):
    """:func:`_describe_tree` of a query atom, with each recursive part ``$(X)`` that is not negated
    replaced by the query of X's first atom (``RecursiveRoot``): an atom matches X only if it
    matches X's first atom, so a screen may use that as a necessary condition. A negated one, or a
    query whose recursive parts cannot be paired with its SMARTS text one to one, stays unknown."""
    described = atom.DescribeQuery()
    tree = _describe_tree(described)[0]
    if "RecursiveStructure" not in described:
        return tree
    parts = _recursions(atom.GetSmarts())
    # the recursive nodes as DescribeQuery lists them: depth first, in the order the SMARTS reads
    negated_nodes = [" not in" in line for line in described.splitlines()
                     if line.strip().startswith("RecursiveStructure")]
    if parts is None or negated_nodes != [negated for negated, _inner in parts]:
        return tree  # the text and the query do not pair up one to one: leave them unknown
    roots = []
    for negated, inner in parts:
        query = Chem.MolFromSmarts(inner)
        if query is None or not query.GetNumAtoms():
            return tree
        roots.append((negated, _atom_tree(query.GetAtomWithIdx(0))))
    next_root = iter(roots).__next__

    def rebuild(node):  # depth first, the order DescribeQuery lists the recursive nodes in
        if node[0] == "RecursiveStructure":
            negated, root = next_root()
            return node if negated else ("RecursiveRoot", None, False, (root,), 1)
        return (node[0], node[1], node[2], tuple(rebuild(kid) for kid in node[3]), node[4])

    return rebuild(tree)


def _may_match(node, key) -> bool | None:
    """Three-valued: can this query node match an atom (or bond) with ``key``? True, False, or None
    (unknown: what the key does not hold, recursive SMARTS...). Only an answer of False is used, so
    an unknown primitive can only keep a pattern, never drop one. An atom key is (atomic number,
    aromatic, formal charge, isotope) and optionally (explicit degree, total H count, number of
    rings), each None where unknown; a bond key is the bond orders present (bit flags)."""
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
    if name == "RecursiveRoot":  # the atom must match the recursive part's first atom; the rest is unknown
        return False if _may_match(kids[0], key) is False else None
    if value is None or kids:
        return None
    if name.startswith("Atom"):
        z, aromatic, charge, isotope = key[:4]
        degree, hs, rings = key[4:] if len(key) == 7 else (None, None, None)
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
        elif name == "AtomHCount" and hs is not None:
            result = hs == value
        elif name == "AtomExplicitDegree" and degree is not None:
            result = degree == value
        elif name == "AtomTotalDegree" and degree is not None and hs is not None:
            result = degree + hs == value  # no hydrogen atoms in the graph (see _Facts)
        elif name == "AtomInNRings" and rings is not None and value >= -1:
            result = rings > 0 if value == -1 else rings == value  # 'R' alone: in some ring
        elif name == "AtomInRing" and rings is not None and value == 1:
            result = rings > 0
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
    atoms = [_atom_tree(a) for a in pattern.GetAtoms()]
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
        self._atoms = [[_atom_tree(a) for a in p.GetAtoms()] for p in self.patterns]
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


def _bond_may_match(node, bond_type: int) -> bool | None:
    """Three-valued, as :func:`_may_match`: can this query bond match a bond of this RDKit BondType
    value (1, 2, 3, 4 or 12: single, double, triple, quadruple, aromatic)? Unknown: None."""
    name, value, negated, kids, nwords = node
    if name in ("BondAnd", "BondOr"):
        if nwords != 1 or not kids:
            return None
        results = [_bond_may_match(kid, bond_type) for kid in kids]
        if name == "BondAnd":
            return False if False in results else (True if all(r is True for r in results) else None)
        return True if True in results else (None if None in results else False)
    if name == "BondNull" and nwords == 1:
        return True
    if value is None or kids:
        return None
    if name == "BondOrder" and value in (1, 2, 3, 4, 12):
        result = bond_type == value
    elif name == "SingleOrAromaticBond" and value == 1:
        result = bond_type in (1, 12)
    else:
        return None
    return result != negated


class _RichScreen:
    """Screens several pattern lists at once with what :class:`_Facts` knows of a molecule. A
    pattern is kept unless one of its query atoms may match none of the molecule's atoms (judged by
    kind, explicit degree, H count and ring count, and a query atom with k query bonds needs an atom
    with at least k bonds), or one of its query bonds may match none of its bonds (judged by both
    ends and the bond type). A necessary condition, as for :class:`_PatternScreen`: only a pattern
    that cannot match is dropped.

    Every query atom and query bond owns a bit; each pattern owns a run of them and a guard bit
    above. A molecule's mask is the OR of one cached mask per distinct atom code and per distinct
    bond; adding one to the bottom of every run carries into the guard of each complete run."""

    def __init__(self, screens: Sequence[_PatternScreen]):
        self.screens = list(screens)
        self._owner: dict[int, tuple[int, int]] = {}  # guard bit -> (screen number, pattern index)
        atom_bits: dict[tuple, int] = {}  # (query atom node, query degree) -> bits
        end_bits: dict[tuple, list[int]] = {}  # (node, degree) -> [begin bits, end bits] of query bonds
        type_bits: dict[tuple, int] = {}  # query bond node -> bits
        low = data = guards = bit = 0
        self._spans: dict[int, tuple[int, int, int]] = {}  # id(screen) -> (number, first bit, past its last guard)
        for number, screen in enumerate(self.screens):
            first_bit = bit
            for i, (pattern, atoms, bonds) in enumerate(zip(screen.patterns, screen._atoms, screen._bonds)):
                start = bit
                low |= 1 << bit
                degrees = [atom.GetDegree() for atom in pattern.GetAtoms()]
                for node, degree in zip(atoms, degrees):
                    atom_bits[(node, degree)] = atom_bits.get((node, degree), 0) | 1 << bit
                    bit += 1
                for bond, node in zip(pattern.GetBonds(), bonds):
                    for side, idx in enumerate((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx())):
                        end_bits.setdefault((atoms[idx], degrees[idx]), [0, 0])[side] |= 1 << bit
                    type_bits[node] = type_bits.get(node, 0) | 1 << bit
                    bit += 1
                data |= ((1 << (bit - start)) - 1) << start
                guards |= 1 << bit
                self._owner[bit] = (number, i)
                bit += 1
            self._spans[id(screen)] = (number, first_bit, bit)
        self._low, self._data, self._guards = low, data, guards
        self._atom_bits, self._end_bits, self._type_bits = atom_bits, end_bits, type_bits
        self._atom_masks: dict[int, int] = {}
        self._end_masks: dict[int, tuple[int, int]] = {}
        self._type_masks: dict[int, int] = {}
        self._pair_masks: dict[int, int] = {}
        self._first: dict[int, dict[int, int]] = {}
        self._may_cache: dict[tuple, bool] = {}

    def _may(self, node, degree: int, key: tuple) -> bool:
        """Whether a query atom (``node``, with ``degree`` query bonds) may be an atom with ``key``."""
        if key[4] is not None and degree > key[4]:
            return False
        cache = self._may_cache  # the same query atoms recur across patterns, screens and masks
        may = cache.get((node, key))
        if may is None:
            if len(cache) > 1 << 17:  # a memo only: keep it bounded
                cache.clear()
            may = cache[(node, key)] = _may_match(node, key) is not False
        return may

    def _atom_mask(self, code: int) -> int:
        mask = self._atom_masks.get(code)
        if mask is None:
            key = _atom_key(code)
            mask = 0
            for (node, degree), bits in self._atom_bits.items():
                if self._may(node, degree, key):
                    mask |= bits
            if len(self._atom_masks) < 1 << 14:  # distinct atom codes: hundreds in practice
                self._atom_masks[code] = mask
        return mask

    def _end_mask(self, code: int) -> tuple[int, int]:
        masks = self._end_masks.get(code)
        if masks is None:
            key = _atom_key(code)
            first = second = 0
            for (node, degree), (begin, end) in self._end_bits.items():
                if self._may(node, degree, key):
                    first, second = first | begin, second | end
            masks = (first, second)
            if len(self._end_masks) < 1 << 14:
                self._end_masks[code] = masks
        return masks

    def _pair_mask(self, pair: int) -> int:
        mask = self._pair_masks.get(pair)
        if mask is None:
            code_a, bond_type, code_b = _Facts.unpair(pair)
            type_mask = self._type_masks.get(bond_type)
            if type_mask is None:
                type_mask = sum(bits for node, bits in self._type_bits.items()
                                if _bond_may_match(node, bond_type) is not False)
                self._type_masks[bond_type] = type_mask
            (first_a, second_a), (first_b, second_b) = self._end_mask(code_a), self._end_mask(code_b)
            mask = ((first_a & second_b) | (first_b & second_a)) & type_mask
            if len(self._pair_masks) < 1 << 14:  # ~400 bytes each; past that, recomputed (4 operations)
                self._pair_masks[pair] = mask
        return mask

    def kept(self, facts: _Facts) -> dict[_PatternScreen, tuple[int, ...]]:
        """Pattern indices that may match, per screen, in order."""
        full = self.guards_kept(facts)
        return {screen: self.decode(full, screen) for screen in self.screens}

    def decode(self, full: int, screen: _PatternScreen) -> tuple[int, ...] | None:
        """The indices of ``screen``'s patterns whose guard bit is set in ``full`` (None: a screen
        this rich screen does not cover). One screen at a time: a molecule whose Crippen terms are
        all remembered never needs the ~20 kept Crippen types decoded."""
        span = self._spans.get(id(screen))
        if span is None or self.screens[span[0]] is not screen:
            return None
        _number, start, stop = span
        owner = self._owner
        text = bin((full >> start) & ((1 << (stop - start)) - 1))[:1:-1]  # bit i at position i
        kept = []
        at = text.find("1")
        while at >= 0:
            kept.append(owner[start + at][1])
            at = text.find("1", at + 1)
        return tuple(kept)

    def guards_kept(self, facts: _Facts) -> int:
        """The guard bits of every pattern that may match (see the class docstring)."""
        mask = 0  # (the caches fill on first use of a code; a race only computes a mask twice)
        atom_masks, pair_masks = self._atom_masks, self._pair_masks
        for code in set(facts.codes):
            bits = atom_masks.get(code)
            mask |= self._atom_mask(code) if bits is None else bits
        for pair in facts.pairs:
            bits = pair_masks.get(pair)
            mask |= self._pair_mask(pair) if bits is None else bits
        return ((mask & self._data) + self._low) & self._guards

    def first_atoms(self, screen: _PatternScreen) -> dict[int, int]:
        """atom code -> bit i set where pattern i of ``screen`` has a first query atom that may be
        an atom with this code (filled by :meth:`first_atom`)."""
        return self._first.setdefault(id(screen), {})

    def first_atom(self, screen: _PatternScreen, code: int) -> int:
        mask = sum(1 << i for i, (pattern, atoms) in enumerate(zip(screen.patterns, screen._atoms))
                   if atoms and self._may(atoms[0], pattern.GetAtomWithIdx(0).GetDegree(), _atom_key(code)))
        known = self.first_atoms(screen)
        if len(known) < 1 << 14:
            known[code] = mask
        return mask


def _rich_screen() -> _RichScreen:
    """One rich screen over QED's alerts and acceptors, Crippen's heavy-atom types, the strict
    rotor's recursive conditions and the HBA pattern's alternatives (the last three where their
    fast routes are on)."""
    typer, rotor, hba = _crippen_heavy(), _rotor_parts(), _hba_parts()
    return _rich_screen_for((_alert_screen(), _acceptor_screen()) + ((typer[0],) if typer is not None else ())
                            + ((rotor[3],) if rotor is not None else ()) + ((hba[2],) if hba is not None else ()))


@lru_cache(maxsize=2)
def _rich_screen_for(screens: tuple[_PatternScreen, ...]) -> _RichScreen:
    return _RichScreen(screens)


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


def _split_atoms(smarts: str) -> list[str | list[str]]:
    """``smarts`` as literal text and bracket atoms, each bracket atom (whose top level has no other
    operator than '&') as its list of '&'-conjuncts; joining them back gives ``smarts``."""
    out: list[str | list[str]] = []
    i = 0
    while True:
        start = smarts.find("[", i)
        if start < 0:
            out.append(smarts[i:])
            return out
        depth, end = 0, start + 1  # the bracket atom's closing ']' (recursive SMARTS nest brackets)
        while end < len(smarts) and not (depth == 0 and smarts[end] == "]"):
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(smarts[end], 0)
            end += 1
        body, terms, depth, term_start = smarts[start + 1:end], [], 0, 0
        for j, char in enumerate(body + "&"):
            if depth == 0 and char in ",;":
                terms = None  # other operators at the top level: the atom stays as it is
                break
            if depth == 0 and char == "&":
                terms.append(body[term_start:j])
                term_start = j + 1
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        out.append(smarts[i:start + 1])
        out.append(terms if terms else body)
        out.append("]")
        i = end + 1


@lru_cache(maxsize=1)
def _rotor_parts() -> tuple[str, list, list[str], _PatternScreen] | None:
    """(the rotor SMARTS, its :func:`_split_atoms`, the X of its ``!$(X)`` conjuncts, a screen of
    those X) or None."""
    smarts = _STRICT_ROTOR
    parts = _split_atoms(smarts)
    recursions = sorted({term[3:-1] for part in parts if isinstance(part, list) for term in part
                         if term.startswith("!$(") and term.endswith(")")})
    patterns = [Chem.MolFromSmarts(x) for x in recursions]
    if not recursions or any(q is None for q in patterns) or "".join(
            p if isinstance(p, str) else "&".join(p) for p in parts) != smarts:
        return None
    return smarts, parts, recursions, _PatternScreen(patterns, reorder=False)



@lru_cache(maxsize=1)
def _hba_parts() -> tuple[str, list[str], _PatternScreen] | None:
    """(the HBA SMARTS, its alternatives X when it is one atom ``[$(X1),$(X2),...]``, a screen of
    the X) or None."""
    smarts = _LIPINSKI_HBA
    parts = _split_atoms(smarts)
    if len(parts) != 4 or parts[0] != "[" or parts[2:] != ["]", ""] or not isinstance(parts[1], str):
        return None
    alternatives, depth, start = [], 0, 0
    for j, char in enumerate(parts[1] + ","):
        if depth == 0 and char == ",":
            alternatives.append(parts[1][start:j])
            start = j + 1
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
    if not all(a.startswith("$(") and a.endswith(")") for a in alternatives):
        return None
    patterns = [Chem.MolFromSmarts(a[2:-1]) for a in alternatives]
    if any(q is None for q in patterns) or "[" + ",".join(alternatives) + "]" != smarts:
        return None
    return smarts, [a[2:-1] for a in alternatives], _PatternScreen(patterns, reorder=False)


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
    from es_merging.modalities.molecule_fast import _heavy_logp_contribs  # (it imports this module)

    typer = (_PatternScreen([q for q, _ in params], reorder=False), [logp for _, logp in params])
    for smiles in _PANEL:
        mol = Chem.MolFromSmiles(smiles)
        expected = [logp for logp, _mr in rdmd._CalcCrippenContribs(Chem.Mol(mol))]
        if _heavy_logp_contribs(mol, _signature(mol, Chem.MolToSmiles(mol)), typer) != expected:
            return None
    return typer

