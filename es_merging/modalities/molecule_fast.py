"""Exact RDKit descriptor values computed with less work: the strict rotatable-bond and Lipinski HBA
counts, Wildman-Crippen LogP and QED. Every number is bit-identical to RDKit's own function; only the
route is shorter (the patterns that cannot match a molecule, by :mod:`molecule_screens`, are not
searched for; work RDKit repeats is done once). Used by :mod:`es_merging.modalities.molecule`.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

from rdkit import Chem, rdBase
from rdkit.Chem import Crippen, QED
from rdkit.Chem import rdMolDescriptors as rdmd

from es_merging.modalities import molecule_atom_memo as memo
from es_merging.modalities import molecule_screens as screens
from es_merging.modalities.molecule_atom_memo import atom_keys
from es_merging.modalities.molecule_screens import (
    _ANY, _HAS_H, _KIND_KEYS, _MANY, _NON_UNIQUE, _PANEL, _UNIQUE, _Facts, _acceptor_screen, _alert_screen,
    _crippen_heavy, _fast_counts, _hba_parts, _rich_screen, _rotor_parts, _signature,
)

# ---------------------------------------------------------------------------------------------
# Exact RDKit values, computed with less work. Every number is bit-identical to RDKit's own function
# (tests/test_molecule_fast_paths.py compares every descriptor, unrounded, with the plain RDKit call
# on ~1,500 varied molecules, and each shortcut with what it replaces); only the route is shorter.
#
# CPU per molecule, generated drug-like SMILES (~23 heavy atoms), RDKit 2026.09, one core of a shared
# 2-core machine (min of 5 passes; +-15% from run to run): RDKit's route -> previous -> now
#   parse              ~97 -> ~119 -> ~80 us  RDKit's log captured per batch, not per SMILES; a SMILES
#                                              without stereo marks or H atoms skips the search for
#                                              possible stereocentres (_parse_plain)
#   Crippen LogP      ~179 -> ~125 -> ~68 us  no AddHs copy; heavy-atom types screened by _Facts
#                                              (_RichScreen) and skipped once every atom they could
#                                              type is typed; H types from the H counts already read
#   rotatable bonds    ~61 ->  ~27 -> ~24 us  one compiled pattern; its !$(X) terms whose X cannot
#                                              match this molecule dropped (_rotor_query)
#   Lipinski HBA       ~29 ->  ~18 us          one compiled pattern
#   QED properties   ~790 -> ~177 -> ~53 us  MW, LogP, HBD, TPSA, rotatable bonds reused; alerts and
#                                              acceptors screened by _Facts (alerts ~124 -> ~31 us);
#                                              aromatic rings as a cycle rank, no copy (~46 -> ~8 us)
#   QED formula         ~6 ->   ~4 us          QED.qed's own operations without its call overhead
#   InChIKey          ~220 ->  ~205 us         '/AuxNone': InChI skips the AuxInfo layer
#   _Facts + screen            ~67 us          what the screens read (codes, bonded pairs), per molecule;
#                                              ring counts from RingInfo, not two [R] searches (~-5 us)
# The canonical SMILES (~46 us) is RDKit's and unchanged. A batch is described stage by stage
# (_describe_mols), another ~25% off. Where a shortcut cannot be sure (explicit H atoms, dative or
# unusual bonds, stereo marks, a non-default RDKit setting...) RDKit's own route is taken. (The parse
# and the InChIKey are in molecule.py, the screens and _Facts in molecule_screens.py.)
#
# Remembered atom terms (molecule_atom_memo): an atom's Crippen type, QED acceptor count and
# Lipinski HBA match depend only on its surroundings one or two bonds deep, so they are remembered
# by an exact key of those surroundings (~19 us a molecule to build) and a molecule whose atoms are
# all known needs no search for them: Crippen ~75 -> ~6 us, HBA ~21 -> ~7 us, acceptors ~12 -> ~2 us
# (the benchmark's cold runs start with an empty memo; ~10% of its molecules then still meet an atom
# they have not seen, and pattern-type only those atoms).
#
# Where the time goes now (share of the CPU of a cold benchmark run, py-spy, ~480 us a molecule):
# InChIKey 38% (RDKit's MolToInchi: ~77% InChI's own GetINCHI, the rest its copy, Kekulize and
# clean-up, none avoidable through rdinchi), parse 15%, _Facts 10% (its two H-count searches ~3%),
# QED properties 8% (alerts ~4%: ~8 searches, ~0.3 of which match; aromatic rings ~1.6%), canonical
# SMILES 7%, atom keys 4%, rotatable bonds 3.5%, Crippen ~3% (mostly the molecules with an unseen
# atom). A search costs ~1.2-2.3 us even when nothing matches (SubstructMatchParameters made once
# save ~0.2-1 us of it). Measured and dropped (same-process A/B): _Facts in numpy (slower on ~25
# atoms), InChI '/SNon' (-9 us, but InChI's undefined-stereo warnings go), other InChI options that
# keep the standard InChI ('/NoLabels', '/NEWPSOFF': no faster), one recursive query over
# the kept alerts before searching them one by one (2x slower), marking plain molecules as
# stereo-assigned instead of AssignStereochemistry (parse unchanged, the SMILES writer then slower),
# a Counter / set of match roots in the Crippen loop and a C-level decode of the rich screen's guard
# bits (both slower), skipping the sanitizer's clean-up steps that are no-ops here (~-4 us: not worth
# the doubt), the SMILES atom order read as a vector (GetProp autoConvert: RDKit iterates it in
# Python, slower than parsing the text), InChI or the canonical SMILES moved next to the parse
# (no change), chunks of 16/32/128 molecules (64 is as fast as any), glibc malloc tunables (no
# change), pausing the garbage collector (no change once parse errors stopped holding a cycle).
# ---------------------------------------------------------------------------------------------
_ROTOR_VARIANTS: dict[tuple[str, frozenset], Chem.Mol] = {}
_ROTOR_BY_SIGNATURE: dict = {}
_ROTOR_BY_KEPT: dict[tuple[str, tuple[int, ...]], Chem.Mol] = {}  # at most 2^10 kept sets of the 10 recursions


def _rotor_query(signature, facts: _Facts | None = None) -> Chem.Mol | None:
    """The strict rotor pattern less its ``!$(X)`` conjuncts whose X cannot match this molecule
    (no F, no Cl, no triple bond, no carbon with three methyls...: by the molecule's :class:`_Facts`
    or else its :func:`_signature`): each is then true of every atom, so the count is the same,
    and RDKit does not search for X (each X is a search of its own)."""
    query = _fast_counts().get("rotb")
    parts = _rotor_parts() if query is not None else None
    if parts is None or parts[0] != screens._STRICT_ROTOR:
        return query
    kept = facts.kept(parts[3]) if facts is not None else None
    if kept is not None:
        return _rotor_variant(query, kept)
    if signature is None:
        return query
    key = (screens._STRICT_ROTOR, signature)
    variant = _ROTOR_BY_SIGNATURE.get(key)
    if variant is None:
        variant = _rotor_variant(query, parts[3].kept(signature))
        if len(_ROTOR_BY_SIGNATURE) < 4096:
            _ROTOR_BY_SIGNATURE[key] = variant
    return variant


def _rotor_variant(query: Chem.Mol, kept: tuple[int, ...]) -> Chem.Mol:
    """The rotor pattern keeping only the recursions ``kept`` (indices into _rotor_parts()[2])."""
    smarts, atoms, recursions, _screen = _rotor_parts()
    variant = _ROTOR_BY_KEPT.get((smarts, kept))  # each kept set's variant, looked up once (~3 us)
    if variant is None:
        variant = _ROTOR_BY_KEPT[(smarts, kept)] = _rotor_variant_of(query, smarts, atoms, recursions, kept)
    return variant


def _rotor_variant_of(query: Chem.Mol, smarts: str, atoms: list, recursions: list[str], kept: tuple[int, ...]) -> Chem.Mol:
    dropped = frozenset(x for i, x in enumerate(recursions) if i not in kept)
    if not dropped:
        return query
    variant = _ROTOR_VARIANTS.get((smarts, dropped))
    if variant is None:
        text = []
        for part in atoms:
            if isinstance(part, str):
                text.append(part)
            else:
                terms = [t for t in part if not (t.startswith("!$(") and t.endswith(")") and t[3:-1] in dropped)]
                text.append("&".join(terms) if terms else "*")
        variant = Chem.MolFromSmarts("".join(text))
        _ROTOR_VARIANTS[(smarts, dropped)] = variant = variant if variant is not None else query
    return variant


def _rotatable_bonds(mol: Chem.Mol, signature=None, facts: _Facts | None = None) -> int:
    """``CalcNumRotatableBonds(mol, Strict)`` (~45 us) as one match count (~20 us; less with the
    molecule's :func:`_signature` or :class:`_Facts`, see :func:`_rotor_query`)."""
    query = _rotor_query(signature, facts)
    if query is None:
        return rdmd.CalcNumRotatableBonds(mol, rdmd.NumRotatableBondsOptions.Strict)
    return len(mol.GetSubstructMatches(query, _UNIQUE))  # RDKit's count: uniquified, at most 1000, as here


def _lipinski_hba(mol: Chem.Mol, signature=None, facts: _Facts | None = None) -> int:
    """``CalcNumHBA(mol)`` (~21 us) as one match count (~13 us; less with the molecule's
    :func:`_signature` or :class:`_Facts`, see :func:`_hba_query`), or, when every atom's key is
    known, the sum of the atoms' remembered matches (molecule_atom_memo, ~7 us)."""
    query = _fast_counts().get("hba")
    if query is None:
        return rdmd.CalcNumHBA(mol)
    keys = atom_keys(facts) if facts is not None and memo.hba_terms_apply(facts) else None
    terms = memo.HBA.terms(keys)
    if terms is not None:  # every atom seen before (the pattern is one atom: a match is an atom)
        return sum(terms)
    query = _hba_query(query, signature, facts)
    matches = mol.GetSubstructMatches(query, _UNIQUE) if query is not None else ()
    if keys is not None:
        counts = [0] * mol.GetNumAtoms()
        for (idx,) in matches:
            counts[idx] = 1
        memo.HBA.learn(keys, counts)
    return len(matches)


_HBA_VARIANTS: dict[tuple[str, tuple[int, ...]], Chem.Mol | None] = {}


def _hba_query(query: Chem.Mol, signature, facts: _Facts | None) -> Chem.Mol | None:
    """The HBA pattern ``[$(X1),$(X2),...]`` less the alternatives X that cannot match this
    molecule (no charged O or S, no aromatic n, o, s...); None when none can (a count of 0)."""
    parts = _hba_parts()
    if parts is None or parts[0] != screens._LIPINSKI_HBA:
        return query
    smarts, alternatives, screen = parts
    kept = facts.kept(screen) if facts is not None else None
    if kept is None:
        if signature is None:
            return query
        kept = screen.kept(signature)
    if len(kept) == len(alternatives):
        return query
    variant = _HBA_VARIANTS.get((smarts, kept), False)
    if variant is False:
        variant = Chem.MolFromSmarts("[" + ",".join(f"$({alternatives[i]})" for i in kept) + "]") if kept else None
        if kept and variant is None:
            variant = query
        _HBA_VARIANTS[(smarts, kept)] = variant
    return variant


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


def _heavy_logp_contribs(mol: Chem.Mol, signature, typer, facts: _Facts | None = None,
                         typed: list[float | None] | None = None) -> list[float]:
    """RDKit's getCrippenAtomContribs for heavy atoms: each pattern in order, every (non-unique, at
    most 1000, as RDKit asks) match types its first atom if still untyped; stop once all are typed.

    With ``facts`` (the molecule's :class:`_Facts`), a pattern is not searched for when the rich
    screen says it cannot match, or when every atom its first query atom may be (by atom code) is
    typed already: neither search could type an atom. Same types, about half the searches.
    ``typed`` (with facts): atoms already typed, by the memo; an atom's type does not depend on the
    others', so the patterns only need to type the rest."""
    screen, logps = typer
    kept = facts.kept(screen) if facts is not None else None
    if kept is not None and typed is not None:
        contribs: list[float | None] = list(typed)
    else:
        contribs = [None] * mol.GetNumAtoms()
    left = contribs.count(None)
    if kept is None:
        for i in screen.kept(signature):
            for match in mol.GetSubstructMatches(screen.patterns[i], _NON_UNIQUE):
                if contribs[match[0]] is None:
                    contribs[match[0]] = logps[i]
                    left -= 1
            if not left:
                break
        return [0.0 if c is None else c for c in contribs]  # untyped: 0, as RDKit's zero-filled vector
    codes, rich = facts.codes, _rich_screen()
    untyped: dict[int, int] = {}
    for code, contrib in zip(codes, contribs):
        if contrib is None:
            untyped[code] = untyped.get(code, 0) + 1
    known = rich.first_atoms(screen)
    first = {code: known[code] if code in known else rich.first_atom(screen, code) for code in untyped}
    live, stale = 0, False  # patterns whose first atom may be an untyped atom (stale: a superset)
    for mask in first.values():
        live |= mask
    for i in kept:
        if not live >> i & 1:
            continue
        if stale:  # some kind of atom is all typed since live was last computed
            live, stale = 0, False
            for code, count in untyped.items():
                if count:
                    live |= first[code]
            if not live >> i & 1:
                continue
        for match in mol.GetSubstructMatches(screen.patterns[i], _NON_UNIQUE):
            atom = match[0]
            if contribs[atom] is None:
                contribs[atom] = logps[i]
                left -= 1
                code = codes[atom]
                untyped[code] -= 1
                stale = stale or not untyped[code]
        if not left:
            break
    return [0.0 if c is None else c for c in contribs]


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
    return _crippen_logp(mol, smiles)


def _crippen_logp(mol: Chem.Mol, smiles: str | None = None, facts: _Facts | None = None) -> float:
    """:func:`crippen_logp`; ``facts`` (this molecule's :class:`_Facts`) screens the heavy-atom types further."""
    if mol.GetNumAtoms() != mol.GetNumHeavyAtoms():
        return Crippen.MolLogP(mol)
    keys = atom_keys(facts) if facts is not None else None
    terms = memo.CRIPPEN.known(keys)
    if terms is not None and None not in terms:  # every atom seen before: RDKit's terms, summed in RDKit's order
        logp = 0.0
        for heavy_logp, _h_logp in terms:
            logp += heavy_logp
        for idx, n_h in sorted(facts.hs.items()):
            h_logp = terms[idx][1]
            for _ in range(n_h):
                logp += h_logp
        return logp
    h_logp = _crippen_h_logp()
    typer = _crippen_heavy() if smiles is not None else None
    if typer is not None:
        typed = [term[0] if term is not None else None for term in terms] if terms is not None else None
        heavy = _heavy_logp_contribs(mol, _signature(mol, smiles), typer, facts, typed)
    else:
        heavy = [logp for logp, _mr in rdmd._CalcCrippenContribs(mol)]
    h_terms: list[tuple[int, int, float]] = []
    if facts is not None and facts.codes is not None:  # the same search, done already
        carriers = [(idx, _KIND_KEYS[facts.codes[idx] >> 12][0], n_h) for idx, n_h in facts.hs.items()]
    else:
        carriers = [(idx, atom.GetAtomicNum(), atom.GetTotalNumHs()) for (idx,) in
                    mol.GetSubstructMatches(_HAS_H, True, False, False, mol.GetNumAtoms())
                    for atom in (mol.GetAtomWithIdx(idx),)]
    for idx, z, n_h in carriers:
        if z == 6:
            label = "H1"
        elif z == 7:
            label = "H3"
        elif z == 8:
            atom = mol.GetAtomWithIdx(idx)
            if atom.GetIsAromatic():
                return Crippen.MolLogP(mol)
            label = _hydroxyl_h_type(atom, n_h)
        else:  # [#1][!#6;!#7;!#8]
            label = "H2"
        h_terms.append((idx, n_h, h_logp[label]))
    if keys is not None:
        per_h: list[float | None] = [None] * len(heavy)
        for idx, _n_h, contrib in h_terms:
            per_h[idx] = contrib
        memo.CRIPPEN.learn(keys, list(zip(heavy, per_h)))
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


def _qed_aromatic_rings(mol: Chem.Mol, smiles: str | None, facts: _Facts | None) -> int:
    """QED's AROM, ``len(GetSSSR(DeleteSubstructs(mol, AliphaticRings)))``, without the copy.

    RDKit's SSSR of a molecule has exactly one ring per independent cycle in each fragment (its
    ring finder falls back to a DFS that finds one per back edge if it ever finds fewer), so the
    count is the cycle rank of what is left: bonds - atoms + fragments. With no atom deleted the
    fragments are those RDKit's SMILES writes ('.'-joined); otherwise they are counted on the bonds
    left (``facts.edges``). Deleting atoms cannot create rings, so no ring means 0. A dative or
    unusual bond (not counted by the SSSR, or written '~'), or no facts: RDKit's own route."""
    if not mol.GetRingInfo().NumRings():
        return 0
    if smiles is None or facts is None or facts.codes is None:
        return len(Chem.GetSSSR(Chem.DeleteSubstructs(mol, QED.AliphaticRings)))
    n_atoms = mol.GetNumAtoms()
    # AliphaticRings is [$([A;R][!a])]: an aliphatic atom in a ring, so none (by the atom codes, whose
    # ring counts are known, or 15 for unknown) means nothing to delete without searching
    deleted = mol.GetSubstructMatches(QED.AliphaticRings, _UNIQUE) if any(
        not _KIND_KEYS[code >> 12][1] and code & _MANY for code in set(facts.codes)) else ()
    if not deleted:
        return mol.GetNumBonds() - n_atoms + smiles.count(".") + 1
    dead = {idx for (idx,) in deleted}
    parent = list(range(n_atoms))
    n_bonds, n_frags = 0, n_atoms - len(dead)
    for a, b in zip(*facts.edges):
        if a in dead or b in dead:
            continue
        n_bonds += 1
        while parent[a] != a:
            parent[a] = a = parent[parent[a]]
        while parent[b] != b:
            parent[b] = b = parent[parent[b]]
        if a != b:
            parent[a] = b
            n_frags -= 1
    return n_bonds - (n_atoms - len(dead)) + n_frags


def _qed_properties_many(mols: Sequence[Chem.Mol], knowns: Sequence[dict | None],
                         smiles: Sequence[str | None],
                         facts: Sequence[_Facts | None] | None = None) -> list[QED.QEDproperties]:
    """:func:`_qed_properties` for several molecules, one stage at a time (see _describe_mols).
    ``facts``: each molecule's :class:`_Facts`, read when its SMILES was written."""
    mols, knowns, smiles = list(mols), list(knowns), list(smiles)
    facts = list(facts) if facts is not None else [None] * len(mols)
    for i, mol in enumerate(mols):
        if mol.GetNumAtoms() != mol.GetNumHeavyAtoms():  # QED works on the molecule without H atoms
            with rdBase.BlockLogs():  # "not removing hydrogen atom without neighbors" is no news to the user
                mols[i] = Chem.RemoveHs(mol)
            knowns[i] = smiles[i] = facts[i] = None
        if smiles[i] is None:
            smiles[i] = Chem.MolToSmiles(mols[i])
            facts[i] = _Facts(mols[i], smiles[i])
        if knowns[i] is None:
            mol, text = mols[i], smiles[i]
            knowns[i] = {"mw": rdmd._CalcMolWt(mol), "logp": _crippen_logp(mol, text, facts[i]),
                         "hbd": rdmd.CalcNumHBD(mol), "tpsa": rdmd.CalcTPSA(mol),
                         "rotb": _rotatable_bonds(mol, _signature(mol, text), facts[i])}
    acceptors, alerts = _acceptor_screen(), _alert_screen()
    kept_alerts = [_kept(alerts, m, text, fact) for m, text, fact in zip(mols, smiles, facts)]
    arom = [_qed_aromatic_rings(m, s, f) for m, s, f in zip(mols, smiles, facts)]
    # QED: sum(len(GetSubstructMatches(p)) for p if HasSubstructMatch(p)); no match adds 0 anyway
    hba = [_acceptor_count(m, text, acceptors, fact) for m, text, fact in zip(mols, smiles, facts)]
    # one C++ FilterCatalog call over the kept alerts is no faster: the searches themselves cost
    n_alerts = [sum(1 for i in kept if m.HasSubstructMatch(alerts.patterns[i], _ANY)) for m, kept in zip(mols, kept_alerts)]
    return [QED.QEDproperties(MW=k["mw"], ALOGP=k["logp"], HBA=a, HBD=k["hbd"], PSA=k["tpsa"], ROTB=k["rotb"],
                              AROM=r, ALERTS=n)
            for k, a, r, n in zip(knowns, hba, arom, n_alerts)]


def _kept(screen, mol: Chem.Mol, smiles: str, facts: _Facts | None) -> tuple[int, ...]:
    """The patterns of ``screen`` that may match: by the molecule's facts, else by its SMILES alone."""
    kept = facts.kept(screen) if facts is not None else None
    return kept if kept is not None else screen.kept(_signature(mol, smiles))


def _acceptor_count(mol: Chem.Mol, smiles: str, acceptors, facts: _Facts | None) -> int:
    """QED's HBA: the matches of its acceptor patterns that may match, or, when every atom's key
    is known, the sum of the atoms' remembered counts (see molecule_atom_memo; each acceptor
    pattern is one atom, so a match is an atom; the screen is then not consulted)."""
    keys = atom_keys(facts) if facts is not None and _single_atom_acceptors() else None
    terms = memo.ACCEPTORS.terms(keys)
    if terms is not None:
        return sum(terms)
    kept = _kept(acceptors, mol, smiles, facts)
    if keys is None:
        return sum(len(mol.GetSubstructMatches(acceptors.patterns[i], _UNIQUE)) for i in kept)
    counts = [0] * mol.GetNumAtoms()
    for i in kept:
        for (idx,) in mol.GetSubstructMatches(acceptors.patterns[i], _UNIQUE):
            counts[idx] += 1
    memo.ACCEPTORS.learn(keys, counts)
    return sum(counts)


@lru_cache(maxsize=1)
def _single_atom_acceptors() -> bool:
    return all(p.GetNumAtoms() == 1 for p in QED.Acceptors)


def qed(mol: Chem.Mol) -> float:
    """Quantitative estimate of drug-likeness (Bickerton 2012, RDKit's mean weights); equals
    ``QED.qed(mol)``."""
    return _qed_value(_qed_properties(mol))


@lru_cache(maxsize=4096)
def _ads(name: str, value) -> float:
    """QED's desirability of one property value: RDKit's own ``QED.ads`` (5 of the 8 are counts)."""
    return QED.ads(value, QED.adsParameters[name])


def _qed_formula(props: QED.QEDproperties) -> float:
    """``QED.qed(None, qedProperties=props)``: the same operations in the same order, RDKit's own
    ads function, parameters and weights, without its per-call overhead (~10 us)."""
    d = [_ads(name, value) if isinstance(value, int) else QED.ads(value, QED.adsParameters[name])
         for name, value in zip(props._fields, props)]
    t = sum(wi * math.log(di) for wi, di in zip(QED.WEIGHT_MEAN, d))
    return math.exp(t / sum(QED.WEIGHT_MEAN))


@lru_cache(maxsize=1)
def _qed_formula_checked() -> bool:
    """Whether :func:`_qed_formula` gives ``QED.qed``'s very number on every _PANEL molecule."""
    for smiles in _PANEL:
        props = QED.properties(Chem.MolFromSmiles(smiles))
        if _qed_formula(props) != QED.qed(None, qedProperties=props):
            return False
    return True


def _qed_value(props: QED.QEDproperties) -> float:
    return _qed_formula(props) if _qed_formula_checked() else QED.qed(None, qedProperties=props)

