"""Protein modality: alphabet validation with positions, FASTA, ambiguity policies, ProtParam."""
from __future__ import annotations

import pytest
from Bio.SeqUtils.ProtParam import ProteinAnalysis

from es_merging.errors import InvalidInputError
from es_merging.modalities.protein import (
    describe_protein, inspect_proteins, parse_fasta, parse_protein, sequence_identity, split_fasta,
)

UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"


def test_raw_sequence_is_cleaned():
    rec = parse_protein("  mqifv ktltg\nKTITL*\n")
    assert rec.sequence == "MQIFVKTLTGKTITL" and rec.id is None and rec.ambiguous == [] and rec.warnings == []


def test_ubiquitin_descriptors():
    d = describe_protein(parse_protein(UBIQUITIN))
    assert d["length"] == 76
    assert d["mw"] == pytest.approx(8564.8, abs=0.5)  # average mass of human ubiquitin
    pa = ProteinAnalysis(UBIQUITIN)
    assert d["pi"] == pytest.approx(pa.isoelectric_point(), abs=1e-3)
    assert 6.0 < d["pi"] < 7.5
    assert d["gravy"] == pytest.approx(pa.gravy(), abs=1e-4)
    assert d["instability_index"] == pytest.approx(pa.instability_index(), abs=1e-3)
    assert d["aromaticity"] == pytest.approx(pa.aromaticity(), abs=1e-4)
    assert sum(d["composition"].values()) == pytest.approx(1.0, abs=1e-3)
    assert d["composition"]["positive"] == pytest.approx((UBIQUITIN.count("K") + UBIQUITIN.count("R")
                                                          + UBIQUITIN.count("H")) / 76, abs=1e-4)


@pytest.mark.parametrize("seq, pos, what", [
    ("MK1A", 3, "'1'"), ("MK*TA", 3, "stop codon"), ("mkjt", 3, "'J'"), ("MK-A", 3, "'-'"),
    ("MKT A\nG.", 6, "'.'"),  # whitespace and newlines do not count as positions
])
def test_invalid_characters_name_position(seq, pos, what):
    with pytest.raises(InvalidInputError) as info:
        parse_protein(seq)
    assert f"position {pos}" in info.value.reason and what in info.value.reason
    assert repr(seq) in str(info.value)


@pytest.mark.parametrize("seq, msg", [("", "empty sequence"), ("  \n", "empty sequence"), ("*", "empty sequence")])
def test_empty(seq, msg):
    with pytest.raises(InvalidInputError, match=msg):
        parse_protein(seq)


def test_length_limits():
    with pytest.raises(InvalidInputError, match="too short: 3 residues < min_length=5"):
        parse_protein("MKT", min_length=5)
    with pytest.raises(InvalidInputError, match="too long: 12 residues > max_length=10"):
        parse_protein("M" * 12, max_length=10)
    with pytest.raises(InvalidInputError, match="too long"):
        parse_protein("M" * 100_000, max_length=10)


def test_fasta_single_and_many():
    rec = parse_protein(">sp|P0CG48|UBC_HUMAN Polyubiquitin-C\nMQIFVKTLTG\nKTITLEVEPS\n")
    assert rec.id == "sp|P0CG48|UBC_HUMAN" and rec.description == "Polyubiquitin-C" and rec.sequence == "MQIFVKTLTGKTITLEVEPS"
    text = ">a first\nMKTAY\n>b\nIAKQR*\n\n>c\nGG\n"
    assert split_fasta(text)[1].startswith(">b")
    recs = parse_fasta(text)
    assert [(r.id, r.sequence) for r in recs] == [("a", "MKTAY"), ("b", "IAKQR"), ("c", "GG")]
    with pytest.raises(InvalidInputError, match="3 FASTA records in one item"):
        parse_protein(text)
    with pytest.raises(InvalidInputError) as info:
        parse_fasta(">a\nMKT\n>b\nMK1\n")
    assert info.value.index == 1 and "position 3" in info.value.reason
    with pytest.raises(InvalidInputError, match="empty sequence in FASTA record 'x'"):
        parse_protein(">x\n\n")
    with pytest.raises(InvalidInputError, match="'>' header line"):
        parse_protein("MKT\n>a\nMKT")


def test_policy_keep():
    rec = parse_protein("MKXTBAY", policy="keep")
    assert rec.sequence == "MKXTBAY" and rec.ambiguous == [(3, "X"), (5, "B")]
    assert "kept: X3, B5" in rec.warnings[0] and "removed" in rec.warnings[0]
    d = describe_protein(rec)
    assert d["length"] == 7 and d["ambiguous"] == 2 and "5 residues" in d["descriptors_on"]
    assert d["mw"] == pytest.approx(ProteinAnalysis("MKTAY").molecular_weight(), abs=0.01)


def test_policy_replace():
    rec = parse_protein("MBZUOXK", policy="replace")
    assert rec.sequence == "MDECKK"  # B->D Z->E U->C O->K, X deleted
    assert "replaced" in rec.warnings[0] and rec.ambiguous[0] == (2, "B")
    assert describe_protein(rec)["mw"] == pytest.approx(ProteinAnalysis("MDECKK").molecular_weight(), abs=0.01)
    with pytest.raises(InvalidInputError, match="no residue left"):
        parse_protein("XXX", policy="replace")


def test_policy_reject():
    with pytest.raises(InvalidInputError, match="ambiguous residue 'U' at position 4"):
        parse_protein("MKTUAXY", policy="reject")
    assert parse_protein("MKTAY", policy="reject").sequence == "MKTAY"
    with pytest.raises(InvalidInputError, match="unknown ambiguity policy"):
        parse_protein("MKT", policy="ignore")


def test_sequence_identity():
    assert sequence_identity(UBIQUITIN, UBIQUITIN.lower()) == 1.0
    assert sequence_identity("MKTAYIAKQR", "MKTAYLAKQR") == pytest.approx(0.9)  # one substitution
    assert sequence_identity("MKTAYIAKQR", "MKTAYAKQR") == pytest.approx(0.9)   # one deletion: 9/10 columns
    assert sequence_identity("MKTAYIAKQR", "MKTAY") == pytest.approx(0.5)       # a fragment is not a match
    assert sequence_identity(UBIQUITIN, "WWWWWWWWWWHHHHHHHHHHPPPPPPPPPP") < 0.2


def test_inspect_batch():
    results = inspect_proteins([UBIQUITIN, "MK1", ">p1 x\nMKXAY", "", "MKZ"], policy="keep", min_length=3)
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert "position 3" in results[1].error
    assert results[2].descriptors["id"] == "p1" and results[2].warnings
    with pytest.raises(InvalidInputError, match="unknown ambiguity policy"):
        inspect_proteins(["MK"], policy="drop")
    rejected = inspect_proteins(["MKZ"], policy="reject")[0]
    assert not rejected.ok and "position 3" in rejected.error
