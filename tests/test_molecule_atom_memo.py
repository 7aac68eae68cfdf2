"""The atom-term memo (molecule_atom_memo): remembered Crippen and QED-acceptor terms must give
RDKit's very numbers, be used when every atom is known, stay out of molecules where RDKit's match
cap could bite, and switch themselves off on a contradiction."""
from __future__ import annotations

import logging
import os

import pytest
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import QED, Crippen
from rdkit.Chem import rdMolDescriptors as rdmd

from es_merging.modalities import molecule as mm
from es_merging.modalities import molecule_atom_memo as memo
from es_merging.modalities import molecule_fast as mf
from es_merging.modalities import molecule_screens as ms

DRUGS = [
    "CC(=O)Oc1ccccc1C(=O)O", "CN1CCN(Cc2ccc(cc2)C(=O)Nc2ccc(C)c(Nc3nccc(n3)-c3cccnc3)c2)CC1",
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "COc1ccc2[nH]cc(CCNC(C)=O)c2c1", "OC(=O)c1ccccc1O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "O=C(O)CCC(=O)O", "[O-][N+](=O)c1ccc(O)cc1", "NC(=N)NCCCC(N)C(=O)O", "CC(=O)NO", "C1=NCCN1", "OC(=O)C=Cc1ccccc1",
    "CCOC(=O)C1=C(C)NC(C)=C(C1c1ccccc1[N+]([O-])=O)C(=O)OC", "CS(=O)(=O)Nc1ccc(O)cc1", "Oc1ccc(cc1)C=O",
]


def _nci(step: int = 7) -> list[str]:
    path = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")  # ships with RDKit
    with open(path) as handle:
        return [line.split()[0] for line in handle if line.strip()][::step]


def _parsed(smiles: list[str]) -> list[tuple[Chem.Mol, str, ms._Facts]]:
    out = []
    with rdBase.BlockLogs():
        for text in smiles:
            mol = Chem.MolFromSmiles(text)
            if mol is not None:
                written = Chem.MolToSmiles(mol)
                out.append((mol, written, ms._Facts(mol, written)))
    return out


@pytest.fixture()
def cold():
    mm.clear_caches()
    yield
    mm.clear_caches()


def _values(entries):
    logps = [mf._crippen_logp(m, s, f) for m, s, f in entries]
    known = [{"mw": 0.0, "logp": lp, "hbd": 0, "tpsa": 0.0, "rotb": 0} for lp in logps]
    acceptors = [p.HBA for p in mf._qed_properties_many([m for m, _, _ in entries], known,
                                                         [s for _, s, _ in entries], [f for _, _, f in entries])]
    hbas = [mf._lipinski_hba(m, ms._signature(m, s), f) for m, s, f in entries]
    return logps, acceptors, hbas


def test_remembered_terms_give_rdkits_numbers(cold, monkeypatch):
    smiles = DRUGS + _nci()
    first = _values(_parsed(smiles))  # learns every key on RDKit's pattern route
    assert len(memo.CRIPPEN) > 300 and len(memo.ACCEPTORS) > 300 and len(memo.HBA) > 300
    # second pass, fresh facts: every atom is known now, so no pattern search may type an atom
    monkeypatch.setattr(mf, "_heavy_logp_contribs", lambda *a, **k: pytest.fail("Crippen searched again"))
    monkeypatch.setattr(mf, "_hba_query", lambda *a, **k: pytest.fail("HBA searched again"))
    entries = _parsed(smiles)
    with_keys = [e for e in entries if memo.atom_keys(e[2]) is not None and memo.hba_terms_apply(e[2])]
    assert len(with_keys) > 0.9 * len(entries)
    logps, acceptors, hbas = _values(with_keys)
    for (mol, text, _facts), logp, acceptor_count, hba in zip(with_keys, logps, acceptors, hbas):
        reference = Chem.Mol(mol)
        assert logp == Crippen.MolLogP(reference), text  # bit-identical, summed in RDKit's order
        assert acceptor_count == QED.properties(reference).HBA, text
        assert hba == rdmd.CalcNumHBA(reference), text
    assert first[0][:len(DRUGS)] == [Crippen.MolLogP(Chem.MolFromSmiles(s)) for s in DRUGS]


def test_hba_memo_leaves_ring_double_bonds_to_the_pattern(cold):
    # an N on a C whose C=N lies inside a ring (2-imidazoline, a cyclic amidine) may be an acceptor
    # where the same atoms with the C=N outside rings would not: the keys do not say which, so a
    # double bond to N, O, P or S between two ring atoms keeps the molecule on the pattern route
    for smiles in ("CN1CCN=C1C", "CN(C)C1=NCCC1"):
        [(mol, text, facts)] = _parsed([smiles])
        assert not memo.hba_terms_apply(facts), smiles
        assert mf._lipinski_hba(mol, ms._signature(mol, text), facts) == rdmd.CalcNumHBA(Chem.Mol(mol))
    assert len(memo.HBA) == 0
    for smiles in ("CN(C)C(=N)C1CC1", "C1CCC(=NC2CCCC2)N1", "O=C1CCCN1"):  # an end outside rings: settled
        [(mol, text, facts)] = _parsed([smiles])
        assert memo.hba_terms_apply(facts), smiles
        assert mf._lipinski_hba(mol, ms._signature(mol, text), facts) == rdmd.CalcNumHBA(Chem.Mol(mol))
    assert len(memo.HBA) > 0


def test_partly_known_molecules_type_only_the_rest(cold):
    entries = _parsed(DRUGS + _nci(13))
    half = len(entries) // 2
    _values(entries[:half])  # learns the first half's keys
    partly = 0
    for mol, text, facts in entries[half:]:
        found = memo.CRIPPEN.known(memo.atom_keys(facts))
        partly += bool(found) and None in found and any(term is not None for term in found)
        assert mf._crippen_logp(mol, text, facts) == Crippen.MolLogP(Chem.Mol(mol)), text
    assert partly > 20


def test_inspect_with_a_warm_memo_equals_a_cold_one(cold):
    smiles = DRUGS + _nci(11)
    cold_run = [r.descriptors for r in mm.inspect_molecules(smiles)]
    known = len(memo.CRIPPEN)
    mm.clear_caches(atom_terms=False)  # descriptors forgotten, atom terms kept
    warm_run = [r.descriptors for r in mm.inspect_molecules(smiles)]
    assert warm_run == cold_run and len(memo.CRIPPEN) == known > 0
    mm.clear_caches()
    assert len(memo.CRIPPEN) == 0 and len(memo.ACCEPTORS) == 0


def test_keys_see_what_the_patterns_see():
    def keys(smiles):
        [(_mol, _text, facts)] = _parsed([smiles])
        return memo.atom_keys(facts)

    ethanol, propanol = keys("CCO"), keys("CCCO")
    assert ethanol[0] == propanol[0]  # a CH3 on a CH2: one key, whatever lies further
    assert ethanol[1] != propanol[1]  # a CH2 between CH3 and O, or between CH3 and CH2
    # an oxygen's key reaches past its neighbour: ketone O vs aldehyde O vs ester O differ
    ketone, aldehyde, ester = keys("CC(C)=O")[3], keys("CCC=O")[3], keys("COC(C)=O")[4]
    assert len({ketone, aldehyde, ester}) == 3
    # the same atom written in another order keeps its key
    assert keys("OCC")[0] == keys("CCO")[2]
    assert keys("[2H]C") is None  # explicit hydrogen atoms: no facts, no memo


def test_molecules_near_the_match_cap_take_rdkits_route(cold, monkeypatch):
    # 45 quaternary carbons: [C](C)(C)(C)C could match each of them 4! = 24 ways, 1,080 in all;
    # RDKit stops at 1,000 matches, so some of them get another type: the cap changes the LogP
    small, big = _parsed(["C" + "C(C)(C)" * 6 + "C", "C" + "C(C)(C)" * 45 + "C"])
    assert mf._crippen_logp(*small) == Crippen.MolLogP(Chem.Mol(small[0]))  # learns every key big has
    mol, text, facts = big
    assert memo.atom_keys(facts) is None
    assert mf._crippen_logp(mol, text, facts) == Crippen.MolLogP(Chem.Mol(mol))
    # without the bound, the remembered terms would answer, and wrongly
    monkeypatch.setattr(memo, "_MATCH_CAP", 10**9)
    mol, text, facts = _parsed([text])[0]
    assert memo.CRIPPEN.terms(memo.atom_keys(facts)) is not None
    assert abs(mf._crippen_logp(mol, text, facts) - Crippen.MolLogP(Chem.Mol(mol))) > 0.1  # 0.24 here


def test_a_contradiction_switches_the_memo_off(cold, caplog):
    [(mol, text, facts)] = _parsed(["CCO"])
    ids = memo.atom_keys(facts)
    memo.CRIPPEN.learn(ids, [(1.0, None)] * len(ids))
    try:
        with caplog.at_level(logging.WARNING):
            memo.CRIPPEN.learn(ids, [(2.0, None)] * len(ids))
        assert not memo.CRIPPEN.enabled and "switched off" in caplog.text
        assert memo.CRIPPEN.terms(ids) is None  # lookups answer nothing: RDKit's route from now on
        [(mol, text, facts)] = _parsed(["CCO"])
        assert mf._crippen_logp(mol, text, facts) == Crippen.MolLogP(Chem.Mol(mol))
    finally:
        memo.CRIPPEN.enabled = True
        memo.CRIPPEN.clear()


def test_recursive_parts_screen_by_their_first_atom():
    screen = ms._alert_screen()
    alkene = next(i for i, p in enumerate(screen.patterns) if "$([C&H2])" in Chem.MolToSmarts(p))
    rich = ms._rich_screen()
    for smiles, can_match in (("NC(=O)c1ccccc1", False), ("C=CCC", True), ("CC(C)=C(C)C", True)):
        [(mol, _text, facts)] = _parsed([smiles])
        kept = facts.kept(screen)
        assert (alkene in kept) == can_match, smiles
        assert (alkene in kept) >= mol.HasSubstructMatch(screen.patterns[alkene])
    # a negated recursive part says nothing about the atom: it stays unknown
    negated = ms._atom_tree(Chem.MolFromSmarts("[!$(*#*)&!D1]").GetAtomWithIdx(0))
    assert "RecursiveRoot" not in repr(negated) and "RecursiveStructure" in repr(negated)
    nested = ms._atom_tree(Chem.MolFromSmarts("[$([O;$(O=C)]),$([nH0])]").GetAtomWithIdx(0))
    assert ms._may_match(nested, (6, False, 0, 0)) is False  # neither an O nor an aromatic n
    assert ms._may_match(nested, (8, False, 0, 0)) is None  # an O: the rest is for the search to say
    assert rich.decode(0, screen) == ()


def test_threads_share_the_memo_safely(cold):
    # the server describes molecules in worker threads: concurrent learning and lookups must give
    # every thread RDKit's numbers
    from concurrent.futures import ThreadPoolExecutor

    smiles = DRUGS + _nci(9)
    expected = [r.descriptors for r in mm.inspect_molecules(smiles)]
    mm.clear_caches()

    def describe(offset):
        mm.clear_caches(atom_terms=False)
        order = smiles[offset:] + smiles[:offset]
        got = [r.descriptors for r in mm.inspect_molecules(order)]
        return got[len(smiles) - offset:] + got[:len(smiles) - offset]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(describe, [0, 37, 101, 211]))
    assert all(result == expected for result in results)
    assert memo.CRIPPEN.enabled and memo.ACCEPTORS.enabled and memo.HBA.enabled
