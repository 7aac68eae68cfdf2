"""Cell modality: profiles from mappings, ranked lists and h5ad files; kinds, errors, spans."""
from __future__ import annotations

import numpy as np
import pytest

from es_merging.errors import InvalidInputError
from es_merging.modalities.cell import (
    CellProfile, cell_from_mapping, cell_from_ranked, cell_span_text, cells_from_h5ad, describe_cell,
    detect_value_kind, gene_jaccard, inspect_cell_profiles, top_genes,
)


# --- mappings -----------------------------------------------------------------------------------
def test_counts_mapping_ranked_and_library_size():
    p = cell_from_mapping({"CD3E": 5, "CD2": 12, "MS4A1": 0, "GNLY": 5, "NKG7": 1})
    assert p.value_kind == "counts" and p.library_size == 23.0
    assert p.genes == ["CD2", "CD3E", "GNLY", "NKG7"]  # zero dropped; tie 5/5 broken by name
    assert p.values == [12.0, 5.0, 5.0, 1.0]


def test_normalized_detection():
    assert detect_value_kind(np.array([0.0, 1.5, 2.0])) == "normalized"
    assert detect_value_kind(np.array([0.0, 1.0, 7.0])) == "counts"
    p = cell_from_mapping({"A": 0.7, "B": 2.3, "C": 0.0})
    assert p.value_kind == "normalized" and p.library_size is None and p.genes == ["B", "A"]
    scaled = cell_from_mapping({"A": -0.5, "B": 1.2, "C": 0.0})
    assert scaled.value_kind == "normalized"
    assert scaled.genes == ["B", "C", "A"]  # scaled data: 0 is the mean, every gene is kept


def test_negative_counts_nan_empty_duplicates():
    with pytest.raises(InvalidInputError, match=r"negative counts for 1 genes: B=-3"):
        cell_from_mapping({"A": 4, "B": -3})  # integers with a negative: broken counts
    with pytest.raises(InvalidInputError, match="negative counts"):
        cell_from_mapping({"A": 4.5, "B": -0.5}, value_kind="counts")
    with pytest.raises(InvalidInputError, match="NaN values for 1 genes: B"):
        cell_from_mapping({"A": 1.0, "B": float("nan")})
    with pytest.raises(InvalidInputError, match="infinite"):
        cell_from_mapping({"A": 1.0, "B": float("inf")})
    with pytest.raises(InvalidInputError, match="empty profile"):
        cell_from_mapping({"A": 0, "B": 0})
    with pytest.raises(InvalidInputError, match="duplicate genes: cd3e"):
        cell_from_mapping({"CD3E": 1, "cd3e": 2})
    with pytest.raises(InvalidInputError, match="not a number"):
        cell_from_mapping({"A": "3"})
    with pytest.raises(InvalidInputError, match="non-empty mapping"):
        cell_from_mapping({})


def test_declared_counts_non_integer_warns():
    p = cell_from_mapping({"A": 2.5, "B": 1.0}, value_kind="counts")
    assert p.value_kind == "counts" and p.library_size == 3.5 and "not all integers" in p.warnings[0]


def test_known_genes_warn_or_error():
    known = {"CD3E", "CD2"}
    p = cell_from_ranked("CD3E, FOO1, CD2, BAR2", known_genes=known)
    assert p.warnings == ["2 unknown gene symbols: FOO1, BAR2"]
    with pytest.raises(InvalidInputError, match="2 unknown gene symbols: FOO1, BAR2"):
        cell_from_ranked("CD3E, FOO1, CD2, BAR2", known_genes=known, unknown_genes="error")
    assert cell_from_mapping({"CD3E": 1}, known_genes=known).warnings == []


# --- ranked lists -------------------------------------------------------------------------------
def test_ranked_inputs():
    p = cell_from_ranked(" CD3E, CD2 ,NKG7,")
    assert p.genes == ["CD3E", "CD2", "NKG7"] and p.value_kind == "ranked" and p.values is None
    assert cell_from_ranked(["A", "B"]).genes == ["A", "B"]
    with pytest.raises(InvalidInputError, match="empty gene name at position 2"):
        cell_from_ranked("A,,B")
    with pytest.raises(InvalidInputError, match="whitespace at position 1"):
        cell_from_ranked("CD3E CD2")
    with pytest.raises(InvalidInputError, match="duplicate genes: A"):
        cell_from_ranked("A,B,A")
    with pytest.raises(InvalidInputError, match="empty gene list"):
        cell_from_ranked(" , ")


def test_spans_and_jaccard():
    a = cell_from_ranked([f"G{i}" for i in range(100)])
    b = cell_from_ranked([f"G{i}" for i in range(25, 125)])
    assert top_genes(a, 3) == ["G0", "G1", "G2"]
    assert cell_span_text(a, 3) == "G0, G1, G2"
    assert gene_jaccard(a, b, k=50) == pytest.approx(25 / 75)  # G25..G49 shared
    assert gene_jaccard(a, a) == 1.0 and gene_jaccard([], []) == 0.0
    d = describe_cell(a, k=5)
    assert d["n_genes"] == 100 and d["top_genes"] == ["G0", "G1", "G2", "G3", "G4"] and d["value_kind"] == "ranked"
    with pytest.raises(InvalidInputError):
        top_genes(a, 0)


# --- h5ad: the real files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbmc(data_dir):
    return data_dir / "singlecell"


def test_h5ad_counts_file(pbmc):
    import anndata

    path = pbmc / "pbmc68k_reduced_counts.h5ad"
    profiles = cells_from_h5ad(path, obs=["AAATTCGATGCACA-1", 0])
    ref = anndata.read_h5ad(path)
    for p, row in zip(profiles, (1, 0)):
        x = ref.X[row].toarray().ravel()
        assert p.id == ref.obs_names[row] and p.value_kind == "counts"
        assert p.library_size == pytest.approx(float(x.sum()))
        assert len(p.genes) == int((x > 0).sum())
        assert p.genes[0] == ref.var_names[int(np.argmax(x))]
        assert p.values[0] == pytest.approx(float(x.max()))
    assert profiles[1].genes[:2] == ["FTL", "CD74"]
    layer = cells_from_h5ad(path, obs=[1], layer="counts")[0]
    assert layer.genes == profiles[0].genes
    with pytest.raises(InvalidInputError, match="no layer 'spliced'"):
        cells_from_h5ad(path, layer="spliced")


def test_h5ad_scaled_file_and_raw(pbmc):
    path = pbmc / "pbmc68k_reduced.h5ad"
    scaled = cells_from_h5ad(path, limit=2)
    assert len(scaled) == 2 and all(p.value_kind == "normalized" for p in scaled)
    assert len(scaled[0].genes) == 765  # negatives present: all genes kept and ranked
    assert scaled[0].library_size == 2557.0  # from obs n_counts
    assert scaled[0].values == sorted(scaled[0].values, reverse=True)
    raw = cells_from_h5ad(path, obs=[1], use_raw=True)[0]  # raw = log1p, non-negative fractions
    counts = cells_from_h5ad(pbmc / "pbmc68k_reduced_counts.h5ad", obs=[1])[0]
    assert raw.value_kind == "normalized" and set(raw.genes) == set(counts.genes)
    assert raw.genes[0] == counts.genes[0] == "FTL"


def test_h5ad_per_cell_errors_in_batch(pbmc):
    path = str(pbmc / "pbmc68k_reduced_counts.h5ad")
    results = inspect_cell_profiles([{"h5ad": path, "obs": ["nope", 3, 9999]}, "CD3E,CD2"], top_k=5)
    assert [r.ok for r in results] == [False, True, False, True]
    assert "obs name 'nope' not found" in results[0].error
    assert "out of range" in results[2].error
    assert results[1].descriptors["value_kind"] == "counts" and len(results[1].descriptors["top_genes"]) == 5
    assert results[1].input.endswith("[3]") and results[3].index == 3
    every = inspect_cell_profiles([path], limit=None)
    assert len(every) == 700 and all(r.ok for r in every)


# --- h5ad: synthetic and malformed files --------------------------------------------------------
def test_h5ad_sparse_ensembl_symbols_and_duplicates(tmp_path):
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    x = np.array([[0, 3, 1, 7], [2, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    var = pd.DataFrame({"gene_symbols": ["CD3E", "CD2", "CD2", "NKG7"]},
                       index=["ENSG00000198851", "ENSG00000116824", "ENSG00000999999", "ENSG00000105374"])
    ad = anndata.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=["c1", "c2", "c3"]), var=var)
    path = tmp_path / "tiny.h5ad"
    ad.write_h5ad(path)
    results = inspect_cell_profiles([str(path)], top_k=10)
    assert [r.ok for r in results] == [True, True, False]
    assert results[0].descriptors["top_genes"] == ["NKG7", "CD2"]  # CD2 keeps its highest value (3)
    assert any("repeated gene symbols" in w for w in results[0].warnings)
    assert results[0].descriptors["library_size"] == 11.0
    assert "empty profile" in results[2].error
    with pytest.raises(InvalidInputError, match="more than max_items=2 cells"):
        inspect_cell_profiles([str(path)], max_items=2)  # one h5ad item expanding past the cap


def test_h5ad_with_nan(tmp_path):
    import anndata

    x = np.array([[1.5, np.nan], [0.5, 2.0]], dtype=np.float32)
    anndata.AnnData(x).write_h5ad(tmp_path / "nan.h5ad")
    results = inspect_cell_profiles([{"h5ad": str(tmp_path / "nan.h5ad")}])
    assert [r.ok for r in results] == [False, True] and "NaN values for 1 genes" in results[0].error


@pytest.mark.parametrize("content, reason", [
    (bytes(range(256)) * 4, "not a readable HDF5/.h5ad file"),
    (b"gene,value\nCD3E,1\n", "not a readable HDF5/.h5ad file"),
])
def test_malformed_h5ad(tmp_path, content, reason):
    path = tmp_path / "bad.h5ad"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError) as info:
        cells_from_h5ad(path)
    assert reason in str(info.value) and str(path) in str(info.value) and "corrupt" in info.value.hint
    result = inspect_cell_profiles([str(path)])
    assert len(result) == 1 and not result[0].ok and reason in result[0].error


def test_h5ad_missing_dir_and_not_anndata(tmp_path):
    import h5py

    with pytest.raises(InvalidInputError, match="file not found"):
        cells_from_h5ad(tmp_path / "missing.h5ad")
    with pytest.raises(InvalidInputError, match="is a directory"):
        cells_from_h5ad(tmp_path)
    with h5py.File(tmp_path / "plain.h5ad", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(InvalidInputError, match="not AnnData: no 'X'"):
        cells_from_h5ad(tmp_path / "plain.h5ad")


def test_inspect_mixed_items_and_limits():
    profile = CellProfile("p", ["A", "B"], None, "ranked", None, "test")
    results = inspect_cell_profiles([profile, {"A": 1, "B": 0}, ["X", "X"], 42], known_genes={"A", "B"})
    assert [r.ok for r in results] == [True, True, False, False]
    assert results[0].descriptors["id"] == "p"
    assert "duplicate genes" in results[2].error
    bad_request = inspect_cell_profiles([{"h5ad": "x.h5ad", "bogus": 1}])[0]
    assert not bad_request.ok and "unknown keys ['bogus']" in bad_request.error
    with pytest.raises(InvalidInputError, match="expected a list of cell profiles, got dict"):
        inspect_cell_profiles({"A": 1.0})
    with pytest.raises(InvalidInputError, match="batch too large"):
        inspect_cell_profiles([["A"], ["B"], ["C"]], max_items=2)
