"""`es-merging inspect ...`: JSON on stdout, exit status 1 when an item is invalid."""
from __future__ import annotations

import json

from es_merging.cli import main

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def run(capsys, *argv):
    code = main(["inspect", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_molecule_aspirin_and_unclosed_ring(capsys):
    code, results = run(capsys, "molecule", ASPIRIN, "C1CC")
    assert code == 1
    assert results[0]["ok"] and results[0]["descriptors"]["inchikey"] == "BSYNRYMUTXBXSQ-UHFFFAOYSA-N"
    assert abs(results[0]["descriptors"]["mw"] - 180.159) < 0.01
    assert not results[1]["ok"] and "'C1CC'" in results[1]["error"] and "unclosed ring" in results[1]["error"]


def test_molecule_all_valid_exits_zero(capsys, tmp_path):
    smi = tmp_path / "mols.smi"
    smi.write_text("CCO ethanol\n\nc1ccccc1 benzene\n")
    code, results = run(capsys, "molecule", ASPIRIN, "--file", str(smi))
    assert code == 0 and [r["descriptors"]["formula"] for r in results] == ["C9H8O4", "C2H6O", "C6H6"]


def test_invalid_smiles_stdout_is_only_json(capfd):
    code = main(["inspect", "molecule", "C1CC", "CC(=O"])
    out, err = capfd.readouterr()
    assert code == 1
    assert [r["ok"] for r in json.loads(out)] == [False, False]  # nothing but the JSON on stdout
    assert "SMILES Parse Error" not in err


def test_protein_fasta_and_policy(capsys, tmp_path):
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">good\nMKTAYIAKQR\n>ambig\nMKBZ\n>bad\nMK1R\n")
    code, results = run(capsys, "protein", "--fasta", str(fasta), "--policy", "replace")
    assert code == 1 and [r["ok"] for r in results] == [True, True, False]
    assert results[1]["descriptors"]["length"] == 4 and "replaced" in results[1]["warnings"][0]
    assert "position 3" in results[2]["error"]
    code, results = run(capsys, "protein", "MKTAYIAKQR", "--policy", "reject")
    assert code == 0 and results[0]["descriptors"]["length"] == 10


def test_cell_genes_and_h5ad(capsys, data_dir):
    path = data_dir / "singlecell" / "pbmc68k_reduced_counts.h5ad"
    code, results = run(capsys, "cell", "--h5ad", str(path), "--obs", "AAAGCCTGGCTAAC-1", "--obs-index", "2",
                        "--top-k", "3", "--genes", "CD3E,CD2")
    assert code == 0 and len(results) == 3
    assert results[0]["descriptors"]["top_genes"] == ["FTL", "CD74", "AIF1"]
    assert results[2]["descriptors"]["value_kind"] == "ranked"
    code, results = run(capsys, "cell", "--h5ad", str(path), "--limit", "4")
    assert code == 0 and len(results) == 4


def test_cell_bad_file_and_usage(capsys, tmp_path):
    bad = tmp_path / "x.h5ad"
    bad.write_text("not hdf5")
    code, results = run(capsys, "cell", "--h5ad", str(bad))
    assert code == 1 and "not a readable HDF5" in results[0]["error"]
    assert main(["inspect", "cell"]) == 2  # nothing to inspect: a usage error, not an item error
    assert "no cell given" in capsys.readouterr().err


def test_bench_with_bare_json_flag_prints_json(capsys, tmp_path):
    """`es-merging bench NAME --json` (no path) is the issue's spelling: JSON on stdout, no file."""
    from es_merging.cli import main

    assert main(["bench", "inspect", "--n", "40", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 40 and result["proteins_per_s"] > 0
    out = tmp_path / "b.json"
    assert main(["bench", "inspect", "--n", "40", "--repeats", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 40
