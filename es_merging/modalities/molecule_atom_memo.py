"""Per-atom descriptor terms remembered by the atom's surroundings, so that a molecule made of atoms
seen before needs no pattern search for them.

Crippen LogP gives every heavy atom the value of the first of Crippen's atom-type patterns that
matches with that atom first, and every hydrogen the value of its carrier's H type; QED counts, per
atom, the acceptor patterns the atom matches; Lipinski's HBA counts the atoms matching one
(recursive) pattern. Each of those patterns looks at its first atom and its neighbours only
(``[CH2X4]a``, ``[c](:a)(:a)-N``), except those rooted at an O, N or S, which look one bond further
through a single neighbour (``[O]=C(C)[A;!#1]``, ``[O-]C(=O)``, the hydroxyl H types
``[#1]OC=[#6,#7,O,S]``, the acceptor ``[N;+0;X3;v3;!$(N[C,S]=O)]``, HBA's
``[O,S;H1;v2]-[!$(*=[O,N,P,S])]`` and ``[N;v3;!$(N-*=!@[O,N,P,S])]``). So the term of an atom is a
function of its :func:`atom_keys` key: the atom's code (kind: element, aromaticity, charge, isotope;
explicit degree; H count) with, per neighbour, the bond type and the neighbour's code, and for N, O
and S, per neighbour, that neighbour's own other neighbours the same way. Every primitive those
patterns test (element, aromaticity, charge, H count, total degree X, valence v, bond order) is
fixed by it; none tests ring size or chirality, and the one ring test (HBA's ``=!@``) is settled
per molecule by :func:`hba_terms_apply`. Two atoms with the same key get the same term, whichever
molecule they are in.

The memo learns a key's term from RDKit's own pattern route (a molecule with any unknown key is
described that way, and teaches the memo all its atoms), and is only used where RDKit's count
cap cannot bite: Crippen typing searches at most 1000 matches per pattern, so a molecule whose
matches could reach that (:func:`atom_keys` bounds them) is never looked up nor learnt from. A
learnt term that contradicts an earlier one (which the argument above rules out) switches the memo
off for good and is logged: RDKit's route is then always taken.
"""
from __future__ import annotations

import logging
import threading
from math import factorial

from es_merging.modalities.molecule_screens import _KIND_KEYS, _MANY, _Facts

log = logging.getLogger(__name__)

_MATCH_CAP = 1000  # RDKit's maxMatches in Crippen's typing (and the default of every search)
_FACTORIAL = [factorial(d) for d in range(_MANY)]
_LOOKS_FURTHER = (7, 8, 16)  # N, O and S: their patterns reach one bond past their neighbours

# A neighbour as seen from an atom, ``neighbour code << 4 | bond type``, gets a 4-bit field of its
# own in an int, in order of first sight: an atom's neighbours as a multiset are then the sum of
# their weights (at most 14 of each: a degree of 15 or more is not used), exact and cheap to build.
_WEIGHTS: dict[int, int] = {}
_IDS_LOCK = threading.Lock()  # guards _WEIGHTS and _KEY_IDS
_MAX_FIELDS = 4096  # distinct neighbour entries; drug-like sets have a few dozen
_deep_kinds: dict[int, bool] = {}  # atom kind -> whether it is an N, O or S
# Each distinct key gets a small int, so that a key is hashed once per atom, not once per memo,
# and the memos are lists indexed by it. At most _MAX_KEYS (~10 MB of keys); past that, molecules
# with a new key take RDKit's route.
_KEY_IDS: dict[tuple, int] = {}
_MAX_KEYS = 1 << 16


def _weight(entry: int) -> int | None:
    with _IDS_LOCK:  # two threads must not give two entries the same field
        weight = _WEIGHTS.get(entry)
        if weight is None and len(_WEIGHTS) < _MAX_FIELDS:
            weight = _WEIGHTS[entry] = 1 << 4 * len(_WEIGHTS)
        return weight


def _key_id(key: tuple) -> int | None:
    with _IDS_LOCK:  # nor two keys the same id
        key_id = _KEY_IDS.get(key)
        if key_id is None and len(_KEY_IDS) < _MAX_KEYS:
            key_id = _KEY_IDS[key] = len(_KEY_IDS)
        return key_id


def _looks_further(kind: int) -> bool:
    deep = _deep_kinds.get(kind)
    if deep is None:
        deep = _deep_kinds[kind] = _KIND_KEYS[kind][0] in _LOOKS_FURTHER
    return deep


def atom_keys(facts: _Facts) -> list[int] | None:
    """One key per atom (see the module docstring), as its small int id, or None when the molecule cannot use
    the memo: no facts, a degree or H count of 15 or more (not known exactly), or a molecule where
    some pattern could reach RDKit's 1000-match cap. Cached on ``facts``.

    A key is ``(code, neighbours)``: the atom's code less its ring count and its neighbours as a
    multiset (see _WEIGHTS); for N, O and S, ``(code, *branches)`` instead, one sorted entry per
    neighbour: (its entry, its own neighbours but this atom, as a multiset).

    The cap bound: a pattern rooted at atom i matches it at most deg(i)! times (its neighbours
    mapped onto i's, in any order), and an N, O or S pattern that looks through a neighbour j at most
    deg(i) * deg(j)^2 times more; the sum over atoms bounds every pattern's match count."""
    if facts.atom_keys is not False:
        return facts.atom_keys
    facts.atom_keys = None
    codes = facts.codes
    if codes is None:
        return None
    short = [code >> 4 for code in codes]  # kind << 8 | degree << 4 | H count: the ring count dropped
    bound = 0
    deep = []
    for i, code in enumerate(short):
        degree = code >> 4 & 15
        if degree == _MANY or code & 15 == _MANY:
            return None
        bound += _FACTORIAL[degree]
        is_deep = _deep_kinds.get(code >> 8)
        if is_deep or is_deep is None and _looks_further(code >> 8):
            deep.append(i)
    around = [0] * len(short)
    weights = _WEIGHTS
    begins, ends = facts.edges
    for a, b, order in zip(begins, ends, facts.orders):
        to_b, to_a = short[b] << 4 | order, short[a] << 4 | order
        weight_b = weights.get(to_b) or _weight(to_b)
        weight_a = weights.get(to_a) or _weight(to_a)
        if weight_a is None or weight_b is None:
            return None
        around[a] += weight_b
        around[b] += weight_a
    keys: list[tuple] = list(zip(short, around))
    if deep:
        branches: dict[int, list] = {i: [] for i in deep}
        for a, b, order in zip(begins, ends, facts.orders):
            if a in branches:
                branches[a].append((short[b] << 4 | order, around[b] - weights[short[a] << 4 | order]))
                bound += (short[a] >> 4 & 15) * (short[b] >> 4 & 15) ** 2
            if b in branches:
                branches[b].append((short[a] << 4 | order, around[a] - weights[short[b] << 4 | order]))
                bound += (short[b] >> 4 & 15) * (short[a] >> 4 & 15) ** 2
        for i, branch in branches.items():
            branch.sort()
            keys[i] = (short[i], *branch)
    if bound >= _MATCH_CAP:
        return None
    ids = _KEY_IDS
    found = [ids.get(key) for key in keys]
    if None in found:
        found = [_key_id(key) for key in keys]
        if None in found:
            return None
    facts.atom_keys = found
    return found


class AtomMemo:
    """key id -> one atom's term (see the module docstring), for one descriptor. Lookups read a
    plain list (safe under the GIL); learning takes a lock. Drug-like sets have a few thousand keys
    (685 in the inspect benchmark's 3,000 molecules, ~2,850 in RDKit's NCI first 3,000)."""

    def __init__(self, name: str):
        self.name = name
        self.enabled = True
        self._terms: list = [None] * _MAX_KEYS
        self._known = 0
        self._lock = threading.Lock()

    def terms(self, ids: list[int] | None) -> list | None:
        """Each atom's term, or None unless every key is known."""
        out = self.known(ids)
        return None if out is None or None in out else out

    def known(self, ids: list[int] | None) -> list | None:
        """Each atom's term where its key is known, else None in its place (None: no keys)."""
        if ids is None or not self.enabled:
            return None
        terms = self._terms
        return [terms[i] for i in ids]

    def learn(self, ids: list[int] | None, terms: list) -> None:
        """Remember each atom's term, as RDKit's route computed it for this molecule."""
        if ids is None or not self.enabled:
            return
        with self._lock:
            known = self._terms
            for i, term in zip(ids, terms):
                old = known[i]
                if old is None:
                    known[i] = term
                    self._known += 1
                elif old != term:
                    self.enabled = False
                    self._terms, self._known = [None] * _MAX_KEYS, 0
                    log.warning("%s memo switched off: one atom key gave %r and %r; RDKit's pattern "
                                "route is used from now on (please report the molecule)", self.name, old, term)
                    return

    def clear(self) -> None:
        with self._lock:
            self._terms = [None] * _MAX_KEYS
            self._known = 0

    def __len__(self) -> int:
        return self._known


def hba_terms_apply(facts: _Facts) -> bool:
    """Whether the HBA memo may describe this molecule. Lipinski's HBA pattern asks of an N whether
    a neighbour has a double bond *outside rings* to O, N, P or S (``!$(N-*=!@[O,N,P,S])``), which
    the keys do not say. A double bond with an end outside every ring is outside rings; only one
    between two ring atoms (or atoms whose ring counts were not read) is left in doubt, and a
    molecule with such a bond to O, N, P or S is described by the pattern and not learnt from."""
    if facts.codes is None:
        return False
    for pair in facts.pairs:
        low, bond_type, high = _Facts.unpair(pair)
        if bond_type == 2 and low & 15 and high & 15 and (
                _KIND_KEYS[low >> 12][0] in _DOUBLE_BOND_ACCEPTOR or _KIND_KEYS[high >> 12][0] in _DOUBLE_BOND_ACCEPTOR):
            return False
    return True


_DOUBLE_BOND_ACCEPTOR = (7, 8, 15, 16)  # [O,N,P,S] in !$(N-*=!@[O,N,P,S])

CRIPPEN = AtomMemo("Crippen LogP")  # term: (heavy-atom LogP, LogP of each of its hydrogens or None)
ACCEPTORS = AtomMemo("QED acceptors")  # term: how many of QED's acceptor patterns the atom matches
HBA = AtomMemo("Lipinski HBA")  # term: 1 if the atom matches Lipinski's HBA pattern, else 0
