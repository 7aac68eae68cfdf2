"""Molecule modality: RDKit parsing with RDKit's reason, descriptors, fingerprints, batches."""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import QED, Crippen, rdinchi
from rdkit.Chem import rdMolDescriptors as rdmd

from es_merging.errors import InvalidInputError
from es_merging.modalities import MODALITIES, inspect
from es_merging.modalities import molecule as molecule_module
from es_merging.modalities import molecule_fast, molecule_screens
from es_merging.modalities.molecule import (
    describe_molecule, inspect_molecules, morgan_fingerprint, morgan_fingerprints, parse_molecule, qed, tanimoto,
    tanimoto_matrix,
)

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
IMATINIB = "CN1CCN(Cc2ccc(cc2)C(=O)Nc2ccc(C)c(Nc3nccc(n3)-c3cccnc3)c2)CC1"


def test_aspirin_descriptors():
    d = describe_molecule(parse_molecule(ASPIRIN))
    assert d["inchikey"] == "BSYNRYMUTXBXSQ-UHFFFAOYSA-N"
    assert d["formula"] == "C9H8O4"
    assert d["mw"] == pytest.approx(180.159, abs=0.01)
    assert d["logp"] == pytest.approx(1.3101, abs=1e-3)
    assert d["tpsa"] == pytest.approx(63.6, abs=0.01)
    assert (d["hbd"], d["hba"], d["rotatable_bonds"], d["aromatic_rings"], d["heavy_atoms"]) == (1, 3, 2, 1, 13)
    assert d["qed"] == pytest.approx(0.5501, abs=1e-3)
    assert d["lipinski_violations"] == 0 and d["lipinski_pass"] is True
    assert d["canonical_smiles"] == "CC(=O)Oc1ccccc1C(=O)O"


def test_lipinski_counts_violations():
    # a C40 alkane: MW ~563 > 500 and LogP ~15.6 > 5: two violations, fails
    d = describe_molecule(parse_molecule("C" * 40))
    assert d["lipinski_violations"] == 2 and d["lipinski_pass"] is False


@pytest.mark.parametrize("smiles", [ASPIRIN, IMATINIB, "CCO", "[2H]C([2H])([2H])O", "[H]OC([H])([H])[H]",
                                    "[Na+].[Cl-]", "C1CC1C(=O)OO", "N#Cc1ccc(S(=O)(=O)N)cc1", "CC(C)(C)C=O"])
def test_qed_equals_rdkit(smiles):
    # our QED skips RDKit's RemoveHs copy and reuses cached values: it must not change the number
    mol = Chem.MolFromSmiles(smiles)
    assert qed(mol) == pytest.approx(QED.qed(mol), abs=1e-12)
    assert describe_molecule(mol)["qed"] == pytest.approx(QED.qed(mol), abs=1e-4)


@pytest.mark.parametrize("smiles, reason", [
    ("C1CC", "unclosed ring"),
    ("CC(=O", "extra open parentheses"),
    ("CC(C)(C)(C)C", "Explicit valence"),
    ("c1cccc1", "kekulize"),
    ("Xy", "syntax error"),
])
def test_invalid_smiles_quotes_item_and_rdkit_reason(smiles, reason):
    with pytest.raises(InvalidInputError) as info:
        parse_molecule(smiles)
    assert repr(smiles) in str(info.value)
    assert reason in info.value.reason


@pytest.mark.parametrize("item, reason", [
    ("", "empty SMILES"), ("   ", "empty SMILES"), ("CC O", "whitespace inside"), (42, "expected a SMILES string"),
])
def test_empty_whitespace_and_type(item, reason):
    with pytest.raises(InvalidInputError, match=reason):
        parse_molecule(item)


def test_too_long():
    with pytest.raises(InvalidInputError, match="too long: 30 characters > max_length=20"):
        parse_molecule("C" * 30, max_length=20)
    assert parse_molecule("  CCO\n").GetNumAtoms() == 3  # surrounding whitespace is fine


def test_invalid_smiles_writes_nothing_to_stdout(capfd):
    results = inspect_molecules(["C1CC", "CC(=O", "c1cccc1"])
    out, err = capfd.readouterr()
    assert out == ""
    assert "SMILES Parse Error" not in err  # captured into the message instead
    assert [r.ok for r in results] == [False, False, False]
    assert "unclosed ring" in results[0].error and "'C1CC'" in results[0].error


def test_batch_one_bad_item_does_not_sink_it():
    results = inspect("molecule", [ASPIRIN, "C1CC", "", "CCO"])
    assert [r.ok for r in results] == [True, False, False, True]
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert results[3].descriptors["formula"] == "C2H6O"
    assert results[1].descriptors is None and results[1].input == "C1CC"


def test_batch_warnings_and_cache_isolation():
    r1 = inspect_molecules(["[Na+].[Cl-]", "CC(O)CBr"])
    assert any("2 disconnected fragments" in w for w in r1[0].warnings)
    assert any("undefined stereo" in w for w in r1[1].warnings)
    r1[1].descriptors["mw"] = -1.0  # a caller mutating its result must not poison the cache
    r2 = inspect_molecules(["CC(O)CBr"])
    assert r2[0].descriptors["mw"] == pytest.approx(138.99, abs=0.01)


def test_batch_limits():
    with pytest.raises(InvalidInputError, match="expected a list"):
        inspect_molecules("CCO")
    with pytest.raises(InvalidInputError, match="batch too large"):
        inspect_molecules(["C"] * 3, max_items=2)
    long = inspect_molecules(["C" * 50], max_length=10)[0]
    assert not long.ok and "too long" in long.error


def test_fingerprints_and_tanimoto():
    fp = morgan_fingerprint(ASPIRIN)
    assert fp.shape == (2048,) and fp.dtype == np.uint8 and set(np.unique(fp)) <= {0, 1} and fp.sum() > 10
    assert morgan_fingerprint(ASPIRIN, n_bits=1024).shape == (1024,)
    assert tanimoto("OCC", "CCO") == 1.0  # same molecule written differently
    sim = tanimoto(ASPIRIN, "OC(=O)c1ccccc1O")  # salicylic acid shares most of aspirin
    assert 0.3 < sim < 1.0
    assert tanimoto(ASPIRIN, "CCCCCCCC") < 0.1
    mats = morgan_fingerprints([ASPIRIN, "OC(=O)c1ccccc1O", IMATINIB])
    m = tanimoto_matrix(mats)
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(sim, abs=1e-6)
    assert tanimoto_matrix(mats[:1], mats).shape == (1, 3)
    assert tanimoto(np.zeros(16, np.uint8), np.zeros(16, np.uint8)) == 0.0


def test_fingerprints_name_the_bad_index():
    with pytest.raises(InvalidInputError) as info:
        morgan_fingerprints(["CCO", "C1CC"])
    assert info.value.index == 1 and "unclosed ring" in str(info.value)


def test_registry():
    assert set(MODALITIES) >= {"molecule", "protein", "cell"}
    with pytest.raises(InvalidInputError, match="unknown modality"):
        inspect("rna", ["ACGU"])


def test_inspect_benchmark_smoke():
    from es_merging.bench.inspect_bench import bench_inspect, make_smiles

    smiles = make_smiles(200, seed=1)
    assert len(set(smiles)) == 200 and sum(s.endswith("C9") for s in smiles) < 20
    result = bench_inspect(n=40, seed=1, repeats=1)
    assert result["smiles_per_s"] > 0 and result["proteins_per_s"] > 0
    assert result["n"] == 40 and 10 < result["mean_heavy_atoms"] < 40
    floor = result["rdkit_floor"]
    assert set(floor["cpu_us_per_molecule"]) == {"parse", "canonical_smiles", "inchikey"}
    assert all(v > 0 for v in floor["cpu_us_per_molecule"].values())
    assert floor["ceiling_per_cpu_s"] == pytest.approx(1e6 / floor["total_cpu_us"], rel=1e-3)
    # the full detail does at least these three calls per molecule (and they were timed alone)
    assert result["full_over_floor"] > 0.8
    assert result["smiles_atom_memo_warm_per_cpu_s"] > 0 and len(result["smiles_atom_memo_warm_runs"]) == 1


# ---------------------------------------------------------------------------------------------
# The shorter routes to RDKit's numbers (crippen_logp, QED's screened alerts, compiled counts,
# stage-by-stage batches) must give RDKit's values exactly, on a few hundred varied molecules.
# ---------------------------------------------------------------------------------------------
# hydroxyl hydrogens of every Crippen type, charges, metals, isotopes, explicit H atoms, cumulenes...
EDGE_SMILES = [
    "O", "[OH-]", "OO", "OS(=O)(=O)O", "ON", "CC(=O)O", "C=CO", "OC=N", "OC=S", "O[Si](C)(C)C", "OB(O)c1ccccc1",
    "OP(=O)(O)O", "[OH3+]", "C=[OH+]", "OCl", "O[N+](=O)[O-]", "Oc1ccccc1", "OC1=CC=CC1", "[H]O[H]", "[2H]O",
    "[oH+]1cccc1", "S", "[SH-]", "P", "B", "[SeH2]", "Cl", "[NH4+]", "[H][H]", "*O", "OC#N", "OS", "O[S+](C)C",
    "OOC(=O)C", "OI", "O=C(O)C=O", "OC=[N+]=[N-]", "O[13CH3]", "C1=C=C=C=C=C=1", "[Na+].[O-]c1ccccc1",
    "[Fe+2].[OH-].[OH-]", "FC(F)(F)C(F)(F)F", "CC(C)(C)C#CC(=O)N(C)C", "ClC(Cl)(Cl)c1ccccc1", "C#N",
    "NC(=[NH2+])c1ccccc1", "C12C3C4C1C5C2C3C45", "c1ccc2cc3ccccc3cc2c1", "O=C1OC(=O)c2ccccc12",
]


@functools.lru_cache(maxsize=1)
def _varied_molecules() -> list:
    from es_merging.bench.inspect_bench import make_smiles

    smiles = [s for s in make_smiles(150, seed=11) if not s.endswith("C9")] + EDGE_SMILES + [ASPIRIN, IMATINIB]
    nci = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")  # ships with RDKit: metals, salts, oddities
    if os.path.exists(nci):
        with open(nci) as handle:
            smiles += [line.split()[0] for line in handle if line.strip()][:4000:16]
    with rdBase.BlockLogs():
        mols = [m for m in (Chem.MolFromSmiles(s) for s in smiles) if m is not None and m.GetNumAtoms()]
    return mols + [Chem.AddHs(m) for m in mols[:20]]  # explicit hydrogen atoms take RDKit's own route


def _reference_description(mol) -> dict:
    """describe_molecule as RDKit computes it, one function per value (the pre-optimisation code)."""
    inchi, _ret, _msg, _log, _aux = rdinchi.MolToInchi(mol)
    mw, logp = rdmd._CalcMolWt(mol), Crippen.MolLogP(mol)
    hbd, hba = rdmd.CalcNumHBD(mol), rdmd.CalcNumHBA(mol)
    violations = int(mw > 500) + int(logp > 5) + int(hbd > 5) + int(hba > 10)
    return {
        "canonical_smiles": Chem.MolToSmiles(mol), "inchikey": rdinchi.InchiToInchiKey(inchi) if inchi else None,
        "formula": rdmd.CalcMolFormula(mol), "mw": round(mw, 4), "logp": round(logp, 4),
        "tpsa": round(rdmd.CalcTPSA(mol), 4), "hbd": hbd, "hba": hba,
        "rotatable_bonds": rdmd.CalcNumRotatableBonds(mol, rdmd.NumRotatableBondsOptions.Strict),
        "aromatic_rings": rdmd.CalcNumAromaticRings(mol), "heavy_atoms": mol.GetNumHeavyAtoms(),
        "fragments": len(Chem.GetMolFrags(mol)), "qed": round(QED.qed(mol), 4),
        "lipinski_violations": violations, "lipinski_pass": violations <= 1,
    }


def test_varied_molecules_cover_enough():
    assert len(_varied_molecules()) > 300


def test_crippen_logp_is_bit_identical_to_rdkit():
    for mol in _varied_molecules():
        expected = Crippen.MolLogP(Chem.Mol(mol))
        assert molecule_module.crippen_logp(Chem.Mol(mol)) == expected, Chem.MolToSmiles(mol)
        assert molecule_module.crippen_logp(Chem.Mol(mol), Chem.MolToSmiles(mol)) == expected, Chem.MolToSmiles(mol)


def test_qed_is_identical_to_rdkit():
    # the alert screen, the rarest-first alert order and the reused values must not change a bit
    for mol in _varied_molecules():
        assert tuple(molecule_fast._qed_properties(Chem.Mol(mol))) == tuple(QED.properties(Chem.Mol(mol))), \
            Chem.MolToSmiles(mol)
        assert qed(Chem.Mol(mol)) == QED.qed(Chem.Mol(mol)), Chem.MolToSmiles(mol)


def test_compiled_counts_equal_rdkit():
    assert set(molecule_screens._fast_counts()) == {"rotb", "hba"}  # the panel check passed on this RDKit
    assert molecule_screens._crippen_heavy() is not None
    strict = rdmd.NumRotatableBondsOptions.Strict
    for mol in _varied_molecules():
        assert molecule_fast._rotatable_bonds(mol) == rdmd.CalcNumRotatableBonds(mol, strict)
        assert molecule_fast._lipinski_hba(mol) == rdmd.CalcNumHBA(mol)


def test_describe_equals_rdkit_reference_at_both_levels():
    mols = _varied_molecules()
    batch = molecule_module._describe_mols([Chem.Mol(m) for m in mols], "full")  # the stage-by-stage route
    for mol, (desc, _warnings) in zip(mols, batch):
        expected = _reference_description(Chem.Mol(mol))
        assert desc == expected and list(desc) == list(expected), Chem.MolToSmiles(mol)
        basic = describe_molecule(Chem.Mol(mol), detail="basic")
        assert basic == {k: v for k, v in expected.items() if k not in ("qed", "inchikey")}
        assert list(basic) == [k for k in expected if k not in ("qed", "inchikey")]


def test_fast_routes_fall_back_to_rdkit_when_a_check_fails(monkeypatch):
    # a pattern that disagrees with RDKit on the panel is dropped; a missing Crippen table too
    monkeypatch.setattr(molecule_screens, "_STRICT_ROTOR", "[!D1]-&!@[!D1]")
    monkeypatch.setattr(RDConfig, "RDDataDir", "/nonexistent")
    molecule_screens._fast_counts.cache_clear()
    molecule_screens._crippen_heavy.cache_clear()
    try:
        assert set(molecule_screens._fast_counts()) == {"hba"}
        assert molecule_screens._crippen_heavy() is None
        mol = parse_molecule(IMATINIB)
        strict = rdmd.NumRotatableBondsOptions.Strict
        assert molecule_fast._rotatable_bonds(mol) == rdmd.CalcNumRotatableBonds(mol, strict)
        assert molecule_module.crippen_logp(mol, Chem.MolToSmiles(mol)) == Crippen.MolLogP(Chem.Mol(mol))
    finally:
        monkeypatch.undo()
        molecule_screens._fast_counts.cache_clear()
        molecule_screens._crippen_heavy.cache_clear()
    assert set(molecule_screens._fast_counts()) == {"rotb", "hba"}


def test_alert_screen_keeps_what_can_match():
    screen = molecule_screens._alert_screen()
    ethanol = parse_molecule("CCO")
    kept = set(screen.kept(molecule_screens._signature(ethanol, "CCO")))
    assert len(kept) < 60  # no aromatic atom, no halogen, no S, no '=': most alerts cannot match
    everything = "CC#CC=CCl.Br.I.F.[Na+].[O-]c1ccsc1.c1cc[n+](C)cc1.[13CH4].[15NH3].[18OH2].[34SH2].P.[SiH4].[SeH2].B"
    mol = parse_molecule(everything)
    assert len(screen.kept(molecule_screens._signature(mol, Chem.MolToSmiles(mol)))) > 100
    # a SMILES that does not account for every atom (not the molecule's own): no screening at all
    assert molecule_screens._signature(ethanol, "CC") is None
    assert screen.kept(None) == tuple(range(len(screen.patterns)))


def test_detail_basic_and_cache_per_level():
    basic = inspect_molecules([ASPIRIN, "C1CC", "CC(O)CBr"], detail="basic")
    assert [r.ok for r in basic] == [True, False, True]
    assert "qed" not in basic[0].descriptors and "inchikey" not in basic[0].descriptors
    assert basic[0].descriptors["logp"] == pytest.approx(1.3101, abs=1e-4)
    assert not any("stereo" in w for w in basic[2].warnings)  # InChI's messages come with the InChIKey
    full = inspect_molecules([ASPIRIN, "CC(O)CBr"])  # the cached basic entry must not answer a full request
    assert full[0].descriptors["inchikey"] == "BSYNRYMUTXBXSQ-UHFFFAOYSA-N" and "qed" in full[0].descriptors
    assert any("undefined stereo" in w for w in full[1].warnings)
    with pytest.raises(InvalidInputError, match="unknown detail level"):
        inspect_molecules([ASPIRIN], detail="fast")
    with pytest.raises(InvalidInputError, match="unknown detail level"):
        describe_molecule(parse_molecule(ASPIRIN), detail="")


def test_batch_order_duplicates_and_chunks(monkeypatch):
    monkeypatch.setattr(molecule_module, "_CHUNK", 3)  # several stage-by-stage chunks
    molecule_module._describe_text.cache_clear()
    items = ["CCO", " CCO ", ASPIRIN, "C1CC", "", IMATINIB, "CCO", 7, "c1ccccc1", "CC(=O", ASPIRIN, "CCN"]
    results = inspect_molecules(items)
    assert [r.index for r in results] == list(range(len(items)))
    assert [r.ok for r in results] == [True, True, True, False, False, True, True, False, True, False, True, True]
    assert results[1].input == " CCO " and results[1].descriptors == results[0].descriptors
    assert results[0].descriptors is not results[6].descriptors  # each result owns its dict
    assert results[5].descriptors["formula"] == "C29H31N7O"
    assert "unclosed ring" in results[3].error and "empty SMILES" in results[4].error
    one_by_one = [inspect_molecules([x])[0].model_dump() for x in items]
    assert [r.model_dump() for r in results] == [dict(r, index=i) for i, r in enumerate(one_by_one)]


def test_inspect_cli_detail_basic(capsys):
    from es_merging.cli import main

    code = main(["inspect", "molecule", ASPIRIN, "--detail", "basic"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and "qed" not in out[0]["descriptors"] and out[0]["descriptors"]["hba"] == 3


def test_inspect_benchmark_reports_both_levels():
    from es_merging.bench.inspect_bench import bench_inspect

    result = bench_inspect(n=30, seed=2, repeats=1)
    assert result["smiles_basic_per_s"] > 0 and result["smiles_basic_per_cpu_s"] > 0
    assert set(result["smiles_detail_levels"]) == {"full", "basic"}
    assert set(result["meets_target"]) == {"smiles_full", "smiles_basic", "proteins"}
