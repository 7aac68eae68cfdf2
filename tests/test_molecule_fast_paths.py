"""The fast inspect route must give RDKit's own numbers: every descriptor of `inspect_molecules`
(batch parse, _Facts screens, stage-by-stage description) against straightforward RDKit calls on
diverse molecules, and each shortcut (parse, pattern screens, ring count, rotor variants, QED
formula, InChI options) against the RDKit call it replaces. A divergence anywhere fails here."""
from __future__ import annotations

import functools
import os

import pytest
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import QED, Crippen, Descriptors, rdinchi
from rdkit.Chem import rdMolDescriptors as rdmd

from es_merging.modalities import molecule as mm
from es_merging.modalities import molecule_fast as mf
from es_merging.modalities import molecule_screens as ms
from es_merging.modalities.molecule import inspect_molecules

STRICT = rdmd.NumRotatableBondsOptions.Strict

# Chosen to reach every branch: QED structural alerts (Michael acceptors, aldehydes, nitro, azo,
# epoxides, thiols, peroxides, acyl halides, polycyclic aromatics, long chains...), charges and
# zwitterions, salts and mixtures, stereo (tetrahedral, E/Z, ring), isotopes, explicit hydrogen
# atoms, fused / bridged / spiro / 3- to 8-membered / macro rings, metals, dative and odd bonds.
DIVERSE = [
    "C=CC(=O)OC", "O=Cc1ccccc1", "[O-][N+](=O)c1ccccc1", "c1ccc(cc1)N=Nc1ccccc1", "ClCC1CO1", "CCS", "CCOOC",
    "CC(=O)Cl", "CN=C=O", "NNc1ccccc1", "CS(=O)(=O)Cl", "Clc1ccccn1", "C#CC(O)C", "CCCCCCCCCCCCCCCC",
    "COP(=O)(OC)OC", "O=C1CCN1", "c1ccc2cc3ccccc3cc2c1", "c1ccc2c(c1)ccc1ccccc12", "O=C(C=Cc1ccccc1)c1ccccc1",
    "N#CC(C#N)=C(C#N)C#N", "ICCI", "BrC(Br)(Br)C", "FC(F)(F)C(F)(F)F", "C1CC1NC(=S)N", "S=C=S", "CC(=O)OC(C)=O",
    "OC1C(O)C(O)C(O)C(O)C1O", "C=CC=CC=C", "OCCOCCOCCO", "CC(C)(C)c1ccc(O)cc1", "Oc1ccccc1O",
    "O=C1C=CC(=O)C=C1", "CSSC", "C1=CC=CC=CC=C1", "O=C(O)CCC(=O)O", "NC(=O)NN=O", "CN(C)N=O", "OCC(O)CO",
    "[N-]=[N+]=NCc1ccccc1", "C1CCOC1", "c1ccc2[nH]ccc2c1", "c1ccoc1", "c1ccsc1", "c1cnc[nH]1", "O=c1cc[nH]cc1",
    # charged, zwitterions, salts, mixtures
    "C[N+](C)(C)C", "[O-]C(=O)c1ccccc1", "[NH3+]CC([O-])=O", "[Na+].[Cl-]", "CC(=O)[O-].[K+]",
    "Cl.CN1CCC(CC1)c1ccccc1", "O.O.[Cu+2].[O-]S(=O)(=O)[O-]", "c1cc[n+](C)cc1.[I-]", "[O-][Cl+3]([O-])([O-])O",
    "CCO.CCO", "[NH4+]", "[OH-]", "C[S+](C)C", "C[O+](C)C",
    # stereo
    "C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O", "F/C=C/F", "C/C=C\\C", "O[C@@H]1CC[C@H](O)CC1",
    "C[C@]12CC[C@H]3[C@@H](CC=C4C[C@@H](O)CC[C@@]43C)[C@@H]1CC[C@@H]2O", "CC(O)CBr", "C/C=C/C(=O)O",
    "C[C@@H](O)[C@H](N)C(=O)O", "N[C@@H](Cc1ccccc1)C(=O)O", "O=C(O)[C@@H]1CCCN1", "C[C@H]1CC[C@@H](C)CC1",
    "F/C(Cl)=C(/Br)I", "OC[C@H]1O[C@@H](O)[C@H](O)[C@@H](O)[C@@H]1O", "C[C@H](Cl)[C@@H](C)Br",
    "[C@@H]1(F)(Cl)Br", "C[S@@](=O)c1ccccc1", "CC[C@@](C)(O)c1ccccc1",
    # isotopes, explicit hydrogens, radicals, odd valences and elements
    "[13CH3]O", "[2H]C([2H])([2H])O", "[H]OC", "[H]C([H])([H])[H]", "[CH3]", "CS(C)(=O)=O", "O=S(=O)(O)O",
    "OB(O)c1ccccc1", "[SeH]C", "C[Si](C)(C)C", "CP(C)(C)=O", "[Fe+2]", "[Pt]", "C[Hg]C", "*CC", "[He]",
    # ring systems
    "C1CC2CCC1C2", "C12C3C4C1C5C2C3C45", "C1CCC2(CC1)CCCC2", "C1CC1", "C1CCCCCC1", "C1CCCCCCC1",
    "C1CCCCCCCCCCCCCC1", "c1ccc2c(c1)[nH]c1ccccc12", "O=C1NC(=O)C(N1)=O", "c1ccc2ncccc2c1",
    # drugs
    "CC(=O)Oc1ccccc1C(=O)O", "CN1CCN(Cc2ccc(cc2)C(=O)Nc2ccc(C)c(Nc3nccc(n3)-c3cccnc3)c2)CC1",
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "OC(=O)c1ccccc1O",
    "COc1ccc2[nH]cc(CCNC(C)=O)c2c1", "CC1(C)S[C@@H]2[C@H](NC(=O)Cc3ccccc3)C(=O)N2[C@H]1C(=O)O",
]
# SMILES that must still fail, each for its own reason
INVALID = ["C1CC", "CC(=O", "CC(C)(C)(C)C", "c1cccc1", "Xy", "", "CC O", "C" * 3000]


@functools.lru_cache(maxsize=1)
def _corpus() -> list[str]:
    from es_merging.bench.inspect_bench import make_smiles

    smiles = list(DIVERSE) + [s for s in make_smiles(300, seed=5) if not s.endswith("C9")]
    nci = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")  # ships with RDKit
    if os.path.exists(nci):
        with open(nci) as handle:
            smiles += [line.split()[0] for line in handle if line.strip()][::5]
    return smiles


def _rdkit_reference(mol: Chem.Mol) -> tuple[dict, str | None]:
    """Every descriptor by the plain RDKit call, and InChI's message with default options."""
    inchi, retcode, message, _log, _aux = rdinchi.MolToInchi(mol)
    mw, logp = Descriptors.MolWt(mol), Crippen.MolLogP(mol)
    hbd, hba = rdmd.CalcNumHBD(mol), rdmd.CalcNumHBA(mol)
    violations = int(mw > 500) + int(logp > 5) + int(hbd > 5) + int(hba > 10)
    desc = {
        "canonical_smiles": Chem.MolToSmiles(mol), "inchikey": Chem.MolToInchiKey(mol) or None,
        "formula": rdmd.CalcMolFormula(mol), "mw": round(mw, 4), "logp": round(logp, 4),
        "tpsa": round(rdmd.CalcTPSA(mol), 4), "hbd": hbd, "hba": hba,
        "rotatable_bonds": rdmd.CalcNumRotatableBonds(mol, STRICT), "aromatic_rings": rdmd.CalcNumAromaticRings(mol),
        "heavy_atoms": mol.GetNumHeavyAtoms(), "fragments": len(Chem.GetMolFrags(mol)),
        "qed": round(QED.qed(mol), 4), "lipinski_violations": violations, "lipinski_pass": violations <= 1,
    }
    warning = (f"InChI: {message}" if retcode and message else None) if inchi else \
        f"no InChIKey: {message or 'InChI generation failed'}"
    return desc, warning


def test_corpus_is_diverse_enough():
    smiles = _corpus()
    with rdBase.BlockLogs():
        mols = [Chem.MolFromSmiles(s) for s in smiles]
    mols = [m for m in mols if m is not None]
    assert len(mols) > 1200
    alerts = [QED.properties(m).ALERTS for m in mols[:400]]
    assert sum(a > 0 for a in alerts) > 60  # plenty of molecules trip QED's structural alerts
    assert sum(any(a.GetFormalCharge() for a in m.GetAtoms()) for m in mols) > 120
    assert sum(len(Chem.GetMolFrags(m)) > 1 for m in mols) > 20
    assert sum(any(a.GetChiralTag() != Chem.ChiralType.CHI_UNSPECIFIED for a in m.GetAtoms()) for m in mols) > 12


def test_inspect_equals_plain_rdkit_calls():
    smiles = _corpus()
    results = inspect_molecules(smiles + INVALID)
    checked = with_alerts = 0
    for text, result in zip(smiles, results):
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(text)
        assert result.ok == (mol is not None), text
        if mol is None:
            continue
        expected, inchi_warning = _rdkit_reference(mol)
        assert result.descriptors == expected, text
        assert list(result.descriptors) == list(expected), text
        assert [w for w in result.warnings if w.startswith(("InChI", "no InChIKey"))] == \
            ([inchi_warning] if inchi_warning else []), text
        checked += 1
        with_alerts += QED.properties(mol).ALERTS > 0
    assert checked > 1200 and with_alerts > 100
    errors = results[len(smiles):]
    assert not any(r.ok for r in errors)
    assert "unclosed ring" in errors[0].error and "extra open parentheses" in errors[1].error
    assert "Explicit valence" in errors[2].error and "kekulize" in errors[3].error.lower()
    assert "syntax error" in errors[4].error and "empty SMILES" in errors[5].error
    assert "whitespace inside" in errors[6].error and "too long" in errors[7].error


def test_unrounded_values_are_bit_identical():
    # rounding to 4 decimals could hide a divergence in the last bits: compare the raw numbers
    smiles = _corpus()
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in smiles) if m is not None]
    for start in range(0, len(mols), 64):
        batch = [Chem.Mol(m) for m in mols[start:start + 64]]
        texts = [Chem.MolToSmiles(m) for m in batch]
        facts = [ms._Facts(m, t) for m, t in zip(batch, texts)]
        logps = [mf._crippen_logp(m, t, f) for m, t, f in zip(batch, texts, facts)]
        rotbs = [mf._rotatable_bonds(m, ms._signature(m, t), f) for m, t, f in zip(batch, texts, facts)]
        known = [{"mw": rdmd._CalcMolWt(m), "logp": lp, "hbd": rdmd.CalcNumHBD(m), "tpsa": rdmd.CalcTPSA(m),
                  "rotb": rb} for m, lp, rb in zip(batch, logps, rotbs)]
        props = mf._qed_properties_many(batch, known, texts, facts)
        for mol, logp, rotb, prop in zip(mols[start:start + 64], logps, rotbs, props):
            reference = Chem.Mol(mol)
            assert logp == Crippen.MolLogP(reference), Chem.MolToSmiles(mol)
            assert rotb == rdmd.CalcNumRotatableBonds(reference, STRICT), Chem.MolToSmiles(mol)
            assert tuple(prop) == tuple(QED.properties(reference)), Chem.MolToSmiles(mol)
            assert mf._qed_value(prop) == QED.qed(reference), Chem.MolToSmiles(mol)


def test_rich_screen_drops_only_patterns_that_cannot_match():
    rich = ms._rich_screen()
    assert len(rich.screens) == 5  # alerts, acceptors, Crippen types, rotor recursions, HBA alternatives
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in _corpus()) if m is not None]
    screened = 0
    for mol in mols:
        for rings in (True, False):
            facts = ms._Facts(mol, Chem.MolToSmiles(mol), rings=rings)
            if facts.codes is None:
                continue
            kept = rich.kept(facts)
            for screen in rich.screens:
                dropped = set(range(len(screen.patterns))) - set(kept[screen])
                matching = {i for i in dropped if mol.HasSubstructMatch(screen.patterns[i])}
                assert not matching, (Chem.MolToSmiles(mol), [Chem.MolToSmarts(screen.patterns[i]) for i in matching])
                screened += len(dropped)
    assert screened > 100_000  # the screen does drop most patterns


def test_facts_read_what_rdkit_reads():
    # the per-atom facts the screens rely on, against RDKit's own atom queries
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in _corpus()) if m is not None]
    no_facts = 0
    for mol in mols:
        facts = ms._Facts(mol, Chem.MolToSmiles(mol))
        if facts.codes is None:
            no_facts += 1
            continue
        ring_info = mol.GetRingInfo()
        for atom, code in zip(mol.GetAtoms(), facts.codes):
            z, aromatic, charge, isotope, degree, hs, rings = ms._atom_key(code)
            assert (z, aromatic, charge, isotope) == (atom.GetAtomicNum(), atom.GetIsAromatic(),
                                                      atom.GetFormalCharge(), atom.GetIsotope())
            assert degree == atom.GetDegree() and hs == atom.GetTotalNumHs()
            assert rings == ring_info.NumAtomRings(atom.GetIdx())
            assert facts.hs.get(atom.GetIdx(), 0) == atom.GetTotalNumHs()
        bonds = {(min(b.GetBeginAtomIdx(), b.GetEndAtomIdx()), max(b.GetBeginAtomIdx(), b.GetEndAtomIdx())):
                 int(b.GetBondType()) for b in mol.GetBonds()}
        assert dict(zip(zip(*facts.edges), facts.orders)) == bonds and len(facts.orders) == len(bonds)
    assert 0 < no_facts < len(mols) // 10  # explicit H atoms, dative bonds...: the safe route


def test_facts_count_four_or_more_hydrogens():
    # the search for atoms with 4+ H runs only when the SMILES may hold one: methane, bracket atoms
    for smiles in ("C", "C.[NH4+]", "[SiH4]", "CC[PH4]", "[13CH4]", "O.C", "[NH4+].[Cl-]", "CC[SH5]", "C[IH6]"):
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            continue
        written = Chem.MolToSmiles(mol)
        assert ms._may_have_four_h(written), written
        facts = ms._Facts(mol, written)
        assert facts.codes is not None, written
        assert [facts.hs.get(a.GetIdx(), 0) for a in mol.GetAtoms()] == [a.GetTotalNumHs() for a in mol.GetAtoms()]
    assert not ms._may_have_four_h("CCO") and not ms._may_have_four_h("[CH3]CC.CC")


def test_fast_parse_gives_rdkits_molecule():
    opts_props = {"_CIPRank", "_ChiralityPossible", "__computedProps"}  # what the fast parse leaves out

    def props(obj):
        return {k: v for k, v in obj.GetPropsAsDict(True, True).items() if k not in opts_props}

    fast = 0
    for text in _corpus():
        if mm._NOT_PLAIN.search(text):
            continue
        with rdBase.BlockLogs():
            expected = Chem.MolFromSmiles(text)
            got = mm._parse_plain(text)
        assert (got is None) == (expected is None), text
        if got is None:
            continue
        fast += 1
        assert got.ToBinary() == expected.ToBinary(), text
        assert props(got) == props(expected), text
        assert all(props(a) == props(b) for a, b in zip(got.GetAtoms(), expected.GetAtoms())), text
        assert all(props(a) == props(b) for a, b in zip(got.GetBonds(), expected.GetBonds())), text
        assert Chem.MolToSmiles(got) == Chem.MolToSmiles(expected), text
        assert rdinchi.MolToInchi(got)[:3] == rdinchi.MolToInchi(expected)[:3], text
    assert fast > 1000
    assert mm._NOT_PLAIN.search("C[C@H](N)O") and mm._NOT_PLAIN.search("F/C=C/F") and mm._NOT_PLAIN.search("[2H]C")
    assert not mm._NOT_PLAIN.search("c1cc[nH]c1") and not mm._NOT_PLAIN.search("C[Hg]C")


def test_aromatic_ring_count_without_the_copy():
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in _corpus()) if m is not None]
    deleted = 0
    for mol in mols:
        mol = Chem.RemoveHs(mol) if mol.GetNumAtoms() != mol.GetNumHeavyAtoms() else mol
        text = Chem.MolToSmiles(mol)
        facts = ms._Facts(mol, text)
        expected = len(Chem.GetSSSR(Chem.DeleteSubstructs(Chem.Mol(mol), QED.AliphaticRings)))
        assert mf._qed_aromatic_rings(mol, text, facts) == expected, text
        deleted += bool(mol.GetSubstructMatches(QED.AliphaticRings))
    assert deleted > 200  # the union-find route is exercised, not only the no-deletion formula


def test_inchi_aux_none_changes_nothing():
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in DIVERSE + _corpus()[-300:]) if m is not None]
    for mol in mols:
        plain, with_option = rdinchi.MolToInchi(mol), rdinchi.MolToInchi(mol, "/AuxNone")
        assert plain[:3] == with_option[:3], Chem.MolToSmiles(mol)  # InChI, return code, message
        key, warning = mm._inchikey(mol)
        assert key == (rdinchi.InchiToInchiKey(plain[0]) if plain[0] else None)


def test_rotor_variants_count_like_the_full_pattern():
    full = Chem.MolFromSmarts(ms._STRICT_ROTOR)
    variants = set()
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in _corpus()) if m is not None]
    for mol in mols:
        text = Chem.MolToSmiles(mol)
        for facts in (None, ms._Facts(mol, text)):
            query = mf._rotor_query(ms._signature(mol, text), facts)
            variants.add(Chem.MolToSmarts(query))
            assert len(mol.GetSubstructMatches(query)) == len(mol.GetSubstructMatches(full)), text
    assert len(variants) > 5


def test_hba_variants_count_like_the_full_pattern():
    variants = set()
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in _corpus()) if m is not None]
    for mol in mols:
        text = Chem.MolToSmiles(mol)
        expected = rdmd.CalcNumHBA(mol)
        for facts in (None, ms._Facts(mol, text)):
            assert mf._lipinski_hba(mol, ms._signature(mol, text), facts) == expected, text
            query = mf._hba_query(ms._fast_counts()["hba"], ms._signature(mol, text), facts)
            variants.add(Chem.MolToSmarts(query) if query is not None else None)
    assert len(variants) > 5 and None in variants  # some molecules need no search at all


@pytest.mark.parametrize("legacy", [True, False])
def test_batch_parse_follows_the_stereo_perception_setting(legacy):
    # the fast parse is only taken under RDKit's default (legacy) stereo perception
    before = Chem.GetUseLegacyStereoPerception()
    Chem.SetUseLegacyStereoPerception(legacy)
    try:
        texts = ["CC(=O)Oc1ccccc1C(=O)O", "CC=CC", "C1CC", "CC(O)CBr"]
        parsed = mm._parse_many(texts)
        assert isinstance(parsed[2], mm.InvalidInputError) and "unclosed ring" in str(parsed[2])
        for text, mol in zip(texts, parsed):
            if not isinstance(mol, mm.InvalidInputError):
                assert Chem.MolToSmiles(mol) == Chem.MolToSmiles(Chem.MolFromSmiles(text))
                assert mol.ToBinary() == Chem.MolFromSmiles(text).ToBinary()
    finally:
        Chem.SetUseLegacyStereoPerception(before)


def test_prebuilt_match_parameters_match_like_the_plain_calls():
    # the searches pass SubstructMatchParameters made once instead of keyword defaults
    queries = [Chem.MolFromSmarts(s) for s in ("[H1,H3]", "[!H0;!H1;!H2;!H3]", "c(:a)(:a):a", "[C&H2](C)C",
                                                "O=[#6][#6]=O", "[$([A;R][!a])]", "[N&+0]([A&!#1])([A&!#1])[A&!#1]")]
    queries += list(QED.StructuralAlerts[:20]) + list(QED.Acceptors)
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in _corpus()[::3]) if m is not None]
    for mol in mols:
        n = mol.GetNumAtoms()
        for query in queries:
            assert mol.GetSubstructMatches(query, ms._NON_UNIQUE) == mol.GetSubstructMatches(query, False, False, False, 1000)
            assert mol.GetSubstructMatches(query, ms._UNIQUE) == mol.GetSubstructMatches(query)
            assert mol.HasSubstructMatch(query, ms._ANY) == mol.HasSubstructMatch(query)
        for query, _bit in ms._H_COUNTS:
            assert mol.GetSubstructMatches(query, ms._EVERY_ATOM) == mol.GetSubstructMatches(query, False, False, False, n)
