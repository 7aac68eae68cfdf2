"""Molecule modality: RDKit parsing with RDKit's reason, descriptors, fingerprints, batches."""
from __future__ import annotations

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import QED

from es_merging.errors import InvalidInputError
from es_merging.modalities import MODALITIES, inspect
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
