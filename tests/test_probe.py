"""Probes: building (triples, lists, tables), sampling, save/load, rendering and exact span masks."""
from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import pytest

from es_merging.errors import ProbeError
from es_merging.probe import (
    PLACEHOLDERS,
    Probe,
    ProbeSample,
    PromptRenderer,
    build_probe,
    response_segments,
    samples_from_lists,
    samples_from_table,
)

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAFFEINE = "Cn1cnc2c1c(=O)n(C)c(=O)n2C"
PROT_A = "MKTAYIAKQRQISFVKSHFSRQ"
PROT_B = "MSDNGPQNQRNAPRITFGGPSDSTGSNQNGERSGARSKQRRPQGLPNNTASWFTALTQHGK"
T_CELL = ["CD3D", "CD3E", "IL7R", "LCK", "ACTB", "B2M"]
MONO = ["CD14", "LYZ", "S100A8", "FCN1", "GAPDH"]

# four clusters of near-identical drugs (one terminal atom varies); Morgan-Tanimoto distances
# inside a cluster stay below those between clusters (asserted in the test that relies on it)
CLUSTERS = {
    "ibuprofen": [f"CC(C)Cc1ccc(cc1)C(C)C(=O)O{s}" for s in ("", "F", "Cl", "C", "O")],
    "caffeine": [f"{s}Cn1cnc2c1c(=O)n(C)c(=O)n2C" for s in ("", "F", "Cl", "C", "O")],
    "palmitate": [f"CCCCCCCCCCCCCCCC(=O)OC{s}" for s in ("", "F", "Cl", "C", "O")],
    "peptide": [f"NCC(=O)NC(CS)C(=O)NC(Cc1c[nH]c2ccccc12)C(=O){s}" for s in ("", "F", "Cl", "C", "O")],
}


# ----------------------------------------------------------------------------- building


def test_build_from_explicit_triples_normalises_each_modality():
    probe = build_probe([
        {"id": "a", "smiles": "OC(=O)c1ccccc1OC(C)=O", "protein": PROT_A.lower(), "cell": T_CELL},
        ProbeSample(id="b", smiles=CAFFEINE, protein=PROT_B, cell=MONO),
    ])
    assert [s.id for s in probe.samples] == ["a", "b"]
    a = probe.samples[0]
    # canonical SMILES: the same molecule written another way canonicalises like aspirin does
    assert a.smiles == build_probe([{"smiles": ASPIRIN}]).samples[0].smiles
    assert a.protein == PROT_A  # upper-cased
    assert a.cell == T_CELL  # rank order kept
    assert probe.modalities() == ["molecule", "protein", "cell"]
    assert probe.strategy == "random" and probe.source == "explicit"
    assert probe.meta["skipped"] == []


def test_build_with_missing_modalities_and_empty_sample():
    probe = build_probe([{"smiles": ASPIRIN}, {"protein": PROT_A}])
    assert probe.modalities() == ["molecule", "protein"]
    assert probe.samples[0].modalities() == ["molecule"]
    with pytest.raises(ProbeError, match="no modality"):
        build_probe([{"id": "x"}])
    with pytest.raises(ProbeError, match="between 1 and"):
        build_probe([{"smiles": ASPIRIN}], n=0)


def test_invalid_samples_are_listed_or_skipped_and_recorded():
    rows = [{"smiles": ASPIRIN}, {"id": "bad-mol", "smiles": "C1CC"}, {"protein": "MK1TA"}, {"cell": ["CD3D", "CD3D"]}]
    with pytest.raises(ProbeError) as err:
        build_probe(rows)
    msg = str(err.value)
    assert "3 invalid probe sample(s)" in msg
    assert "sample 1 (bad-mol)" in msg and "C1CC" in msg
    assert "sample 2" in msg and "sample 3" in msg and "duplicate" in msg
    probe = build_probe(rows, skip_invalid=True)
    assert len(probe.samples) == 1
    assert [s["index"] for s in probe.meta["skipped"]] == [1, 2, 3]
    assert probe.meta["skipped"][0]["id"] == "bad-mol"
    assert "C1CC" in probe.meta["skipped"][0]["error"]
    assert probe.summary()["skipped"] == 3
    with pytest.raises(ProbeError, match="no valid samples"):
        build_probe([{"smiles": "C1CC"}], skip_invalid=True)


def test_lists_zip_pairs_by_position():
    rows = samples_from_lists([ASPIRIN, CAFFEINE], [PROT_A, PROT_B], [T_CELL, ",".join(MONO)])
    assert rows == [
        {"smiles": ASPIRIN, "protein": PROT_A, "cell": T_CELL},
        {"smiles": CAFFEINE, "protein": PROT_B, "cell": MONO},
    ]
    assert samples_from_lists([ASPIRIN, CAFFEINE]) == [{"smiles": ASPIRIN}, {"smiles": CAFFEINE}]
    with pytest.raises(ProbeError, match="equal list lengths"):
        samples_from_lists([ASPIRIN, CAFFEINE], [PROT_A])
    with pytest.raises(ProbeError, match="at least one"):
        samples_from_lists()
    with pytest.raises(ProbeError, match="unknown pairing"):
        samples_from_lists([ASPIRIN], pairing="cross")


def test_lists_random_pairing_is_seeded():
    smiles = [s for c in CLUSTERS.values() for s in c]  # 20
    proteins = [PROT_A, PROT_B, "MAAAKLLV", "MGGHHKKL"]
    cells = [T_CELL, MONO]
    a = samples_from_lists(smiles, proteins, cells, pairing="random", n=30, seed=3)
    b = samples_from_lists(smiles, proteins, cells, pairing="random", n=30, seed=3)
    c = samples_from_lists(smiles, proteins, cells, pairing="random", n=30, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 30
    for row in a:
        assert row["smiles"] in smiles and row["protein"] in proteins and row["cell"] in cells
    # pairing really mixes: not the zip order
    assert len({(r["smiles"], r["protein"]) for r in a}) > 10
    with pytest.raises(ProbeError, match="needs n"):
        samples_from_lists(smiles, proteins, pairing="random")


def _write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_table_csv_with_a_bad_row(tmp_path):
    table = _write_csv(tmp_path / "t.csv", [
        {"id": "d1", "smiles": ASPIRIN, "protein": PROT_A, "cell": ",".join(T_CELL)},
        {"id": "", "smiles": "C1CC", "protein": PROT_B, "cell": ",".join(MONO)},
        {"id": "d3", "smiles": CAFFEINE, "protein": PROT_B, "cell": " CD14 , LYZ "},
    ])
    rows = samples_from_table(table)
    assert rows[0] == {"id": "d1", "smiles": ASPIRIN, "protein": PROT_A, "cell": T_CELL}
    assert rows[1]["id"] == "row3"  # line number when no id
    assert rows[2]["cell"] == ["CD14", "LYZ"]
    with pytest.raises(ProbeError) as err:
        build_probe(rows)
    assert "sample 1 (row3)" in str(err.value) and "C1CC" in str(err.value)
    probe = build_probe(rows, skip_invalid=True)
    assert [s.id for s in probe.samples] == ["d1", "d3"]
    assert probe.meta["skipped"][0]["id"] == "row3"


def test_table_tsv_with_gene_lists_and_column_case(tmp_path):
    # gene lists hold more commas than the header has tabs: the delimiter must still be a tab
    genes = T_CELL + ["GAPDH", "MALAT1", "FTL", "TPT1"]
    path = tmp_path / "t.tsv"
    path.write_text("SMILES\tProtein\tCell\n" + f"{ASPIRIN}\t{PROT_A}\t{','.join(genes)}\n" + f"{CAFFEINE}\t\t{','.join(MONO)}\n")
    rows = samples_from_table(path)
    assert rows == [
        {"smiles": ASPIRIN, "protein": PROT_A, "cell": genes, "id": "row2"},
        {"smiles": CAFFEINE, "cell": MONO, "id": "row3"},
    ]


def test_table_with_byte_order_mark(tmp_path):
    # spreadsheet exports start with a BOM: the first column must still be found
    path = tmp_path / "excel.csv"
    path.write_bytes("smiles,protein\n".encode("utf-8-sig") + f"{ASPIRIN},{PROT_A}\n".encode())
    assert samples_from_table(path) == [{"smiles": ASPIRIN, "protein": PROT_A, "id": "row2"}]


def test_table_errors(tmp_path):
    with pytest.raises(ProbeError, match="does not exist"):
        samples_from_table(tmp_path / "nope.csv")
    (tmp_path / "cols.csv").write_text("drug,target\nCCO,MKT\n")
    with pytest.raises(ProbeError, match="no column named smiles"):
        samples_from_table(tmp_path / "cols.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ProbeError, match="empty"):
        samples_from_table(tmp_path / "empty.csv")
    (tmp_path / "utf16.csv").write_bytes("smiles\nCCO\n".encode("utf-16"))
    with pytest.raises(ProbeError, match="not UTF-8 text"):
        samples_from_table(tmp_path / "utf16.csv")


# ----------------------------------------------------------------------------- sampling


@functools.lru_cache(maxsize=1)
def _canonical_clusters() -> dict[str, str]:
    from es_merging.modalities.molecule import describe_molecule, parse_molecule

    return {describe_molecule(parse_molecule(s))["canonical_smiles"]: c for c, ss in CLUSTERS.items() for s in ss}


def _cluster_of(smiles: str) -> str:
    return _canonical_clusters()[smiles]


def test_cluster_fixture_is_well_separated():
    from rdkit import DataStructs
    from rdkit.Chem import MolFromSmiles, rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    items = [(c, gen.GetFingerprint(MolFromSmiles(s))) for c, ss in CLUSTERS.items() for s in ss]
    intra = [1 - DataStructs.TanimotoSimilarity(a, b) for i, (ca, a) in enumerate(items)
             for cb, b in items[i + 1:] if ca == cb]
    inter = [1 - DataStructs.TanimotoSimilarity(a, b) for i, (ca, a) in enumerate(items)
             for cb, b in items[i + 1:] if ca != cb]
    assert max(intra) < min(inter)


def test_random_sampling_is_seeded():
    rows = [{"id": str(i), "smiles": s} for i, s in enumerate(s for c in CLUSTERS.values() for s in c)]
    a = build_probe(rows, n=6, strategy="random", seed=1)
    b = build_probe(rows, n=6, strategy="random", seed=1)
    c = build_probe(rows, n=6, strategy="random", seed=2)
    assert [s.id for s in a.samples] == [s.id for s in b.samples]
    assert [s.id for s in a.samples] != [s.id for s in c.samples]
    assert len(a.samples) == 6 and len({s.id for s in a.samples}) == 6
    assert a.seed == 1 and a.strategy == "random"
    # n >= available keeps everything
    assert len(build_probe(rows, n=100).samples) == len(rows)
    with pytest.raises(ProbeError, match="unknown sampling strategy"):
        build_probe(rows, n=3, strategy="greedy")


def test_diverse_sampling_picks_one_per_cluster_random_does_not():
    rows = [{"id": f"{c}{i}", "smiles": s} for c, ss in CLUSTERS.items() for i, s in enumerate(ss)]
    for seed in range(5):
        probe = build_probe(rows, n=4, strategy="diverse", seed=seed)
        assert sorted(_cluster_of(s.smiles) for s in probe.samples) == sorted(CLUSTERS)
        again = build_probe(rows, n=4, strategy="diverse", seed=seed)
        assert [s.id for s in again.samples] == [s.id for s in probe.samples]
    # random picks often repeat a cluster (P(all four distinct) ~ 0.13 per draw)
    covered = [len({_cluster_of(s.smiles) for s in build_probe(rows, n=4, seed=seed).samples}) for seed in range(10)]
    assert min(covered) < 4
    with pytest.raises(ProbeError, match="needs a smiles"):
        build_probe(rows + [{"protein": PROT_A}], n=3, strategy="diverse")


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_with_hash(tmp_path):
    probe = build_probe([{"smiles": ASPIRIN, "protein": PROT_A, "cell": T_CELL},
                         {"smiles": CAFFEINE, "protein": PROT_B, "cell": MONO}], seed=7)
    path = probe.save(tmp_path / "sub" / "p.json")
    data = json.loads(path.read_text())
    assert data["hash"] == probe.content_hash and data["hash"].startswith("sha256:")
    assert data["format"] == "es-merging-probe/1"
    loaded = Probe.load(path)
    assert loaded == probe
    assert loaded.content_hash == probe.content_hash
    # no temporary files left beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.json"]
    # the hash depends on the samples, not on how they were chosen
    other = probe.model_copy(update={"strategy": "diverse", "seed": 99})
    assert other.content_hash == probe.content_hash
    changed = probe.model_copy(update={"samples": probe.samples[:1]})
    assert changed.content_hash != probe.content_hash


def test_hand_edited_probe_is_refused(tmp_path):
    probe = build_probe([{"smiles": ASPIRIN, "cell": T_CELL}, {"smiles": CAFFEINE, "cell": MONO}])
    path = probe.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    data["samples"][1]["cell"] = ["CD19", "MS4A1"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProbeError, match="hash mismatch"):
        Probe.load(path)


def test_probe_without_hash_is_refused(tmp_path):
    probe = build_probe([{"smiles": ASPIRIN, "cell": T_CELL}, {"smiles": CAFFEINE, "cell": MONO}])
    path = probe.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    for bad in (None, "", 7):
        if bad is None:
            data.pop("hash", None)
        else:
            data["hash"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(ProbeError, match=r"p\.json has no content \"hash\".*probe build"):
            Probe.load(path)


def test_missing_and_garbled_probe_files(tmp_path):
    with pytest.raises(ProbeError, match="does not exist"):
        Probe.load(tmp_path / "none.json")
    (tmp_path / "garbled.json").write_text('{"format": "es-merging-probe/1", "samples": [')
    with pytest.raises(ProbeError, match="not valid JSON"):
        Probe.load(tmp_path / "garbled.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ProbeError):
        Probe.load(tmp_path / "binary.json")
    (tmp_path / "other.json").write_text(json.dumps({"samples": []}))
    with pytest.raises(ProbeError, match="format"):
        Probe.load(tmp_path / "other.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ProbeError, match="format"):
        Probe.load(tmp_path / "list.json")
    (tmp_path / "badsample.json").write_text(json.dumps({"format": "es-merging-probe/1",
                                                          "samples": [{"smiles": 5, "colour": "red"}]}))
    with pytest.raises(ProbeError, match="badsample.json"):
        Probe.load(tmp_path / "badsample.json")
    with pytest.raises(ProbeError, match="cannot be read"):
        Probe.load(tmp_path)


# ----------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def renderer(zoo_dir):
    from transformers import AutoTokenizer

    from es_merging.encoders import load_encoder

    tok = AutoTokenizer.from_pretrained(str(zoo_dir / "base"))
    counts = {m: load_encoder(zoo_dir / m / "encoder").num_tokens for m in ("molecule", "protein")}
    return PromptRenderer(tok, counts)


def _span(mask: list[bool]) -> tuple[int, int]:
    idx = [i for i, v in enumerate(mask) if v]
    assert idx == list(range(idx[0], idx[-1] + 1)), "mask is not one contiguous span"
    return idx[0], idx[-1] + 1


def test_masks_cover_exactly_their_spans(renderer):
    tok = renderer.tokenizer
    genes = T_CELL + ["GAPDH", "MALAT1", "FTL", "TPT1", "RPL13", "RPS27", "EEF1A1", "FTH1", "HLA-A", "UBB", "PTMA",
                      "MYL6", "CD2"]  # 19 genes, top 16 rendered
    sample = ProbeSample(smiles=ASPIRIN, protein=PROT_A, cell=genes)
    r = renderer.render(sample)
    ids = r.input_ids
    mol_id = tok.convert_tokens_to_ids(PLACEHOLDERS["molecule"])
    prot_id = tok.convert_tokens_to_ids(PLACEHOLDERS["protein"])
    assert mol_id != tok.unk_token_id and prot_id != tok.unk_token_id and mol_id != prot_id
    assert set(r.masks) == {"molecule", "protein", "cell"}
    for mask in r.masks.values():
        assert len(mask) == len(ids)

    s, e = _span(r.masks["molecule"])
    assert ids[s:e] == [mol_id] * 8
    assert ids.count(mol_id) == 8  # no placeholder outside the mask
    s, e = _span(r.masks["protein"])
    assert ids[s:e] == [prot_id] * (len(PROT_A) + 2)
    assert ids.count(prot_id) == len(PROT_A) + 2
    s, e = _span(r.masks["cell"])
    cell_text = " " + ", ".join(genes[:16])
    assert ids[s:e] == tok(cell_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[s:e]) == cell_text
    assert tok.decode(ids[:s]).endswith("Cell:")
    assert tok.decode(ids[e:]).startswith("\nQuestion:")
    assert "CD2" not in tok.decode(ids)  # the 19th gene is beyond top-k

    # no overlap between modalities
    for i in range(len(ids)):
        assert sum(m[i] for m in r.masks.values()) <= 1
    # raw inputs for the encoders: exactly the placeholder modalities
    assert r.soft_inputs == {"molecule": ASPIRIN, "protein": PROT_A}
    assert r.prompt_length == len(ids) and r.target_spans == []


def test_prompt_uses_the_chat_template(renderer):
    tok = renderer.tokenizer
    r = renderer.render(ProbeSample(smiles=ASPIRIN, protein="MKV", cell=MONO), question="Binds?")
    body = f"Molecule: {'<mol>' * 8}\nProtein: {'<prot>' * 5}\nCell: {', '.join(MONO)}\nQuestion: Binds?"
    expected = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    assert renderer.prefix and renderer.suffix
    assert "<|user|>" in renderer.prefix and "<|assistant|>" in renderer.suffix
    assert tok.decode(r.input_ids) == expected
    prefix_ids = tok(renderer.prefix, add_special_tokens=False)["input_ids"]
    suffix_ids = tok(renderer.suffix, add_special_tokens=False)["input_ids"]
    assert r.input_ids[:len(prefix_ids)] == prefix_ids
    assert r.input_ids[-len(suffix_ids):] == suffix_ids
    assert r.input_ids[0] == tok.bos_token_id


def test_text_spans_and_response_targets(renderer):
    tok = renderer.tokenizer
    sample = ProbeSample(smiles=ASPIRIN, protein=PROT_A, cell=T_CELL,
                         descriptors={"molecule": "lipophilic", "protein": "kinase", "cell": "T-cell"})
    reply = response_segments([("molecule", "lipophilic"), ("protein", "kinase")], "Yes", tok.eos_token)
    r = renderer.render(sample, spans={"molecule": "text", "protein": "raw", "cell": "text"}, response=reply)
    s, e = _span(r.masks["molecule"])
    assert tok.decode(r.input_ids[s:e]) == " lipophilic"
    s, e = _span(r.masks["cell"])
    assert tok.decode(r.input_ids[s:e]) == " T-cell"
    assert "CD3D" not in tok.decode(r.input_ids)
    assert r.soft_inputs == {"protein": PROT_A}  # molecule rendered as text needs no encoder
    # masks end before the reply; targets point at the named reply tokens
    assert not any(m[i] for m in r.masks.values() for i in range(r.prompt_length, len(r.input_ids)))
    named = {name: tok.decode(r.input_ids[s:e]) for name, s, e in r.target_spans}
    assert named == {"slot:molecule": " lipophilic", "slot:protein": " kinase", "answer": " Yes"}
    assert all(s >= r.prompt_length for _, s, _ in r.target_spans)
    assert tok.decode(r.input_ids[r.prompt_length:]) == " molecule: lipophilic; protein: kinase. Final answer: Yes</s>"


def test_render_errors(renderer):
    tok = renderer.tokenizer
    with pytest.raises(ProbeError, match="no molecule descriptor"):
        renderer.render(ProbeSample(smiles=ASPIRIN), spans={"molecule": "text"})
    bare = PromptRenderer(tok, {})
    with pytest.raises(ProbeError, match="no encoder for modality 'protein'"):
        bare.render(ProbeSample(protein=PROT_A))
    # a sample with only a cell renders without any encoder
    r = bare.render(ProbeSample(cell=MONO))
    assert set(r.masks) == {"cell"} and r.soft_inputs == {}
    assert tok.decode(r.input_ids).count("Cell:") == 1 and "Molecule" not in tok.decode(r.input_ids)


# ----------------------------------------------------------------------------- CLI


def test_cli_probe_build_from_table(tmp_path, capsys):
    from es_merging.cli import main

    table = _write_csv(tmp_path / "t.csv", [
        {"smiles": s, "protein": PROT_A if i % 2 else PROT_B, "cell": ",".join(T_CELL if i % 3 else MONO)}
        for i, s in enumerate(s for c in CLUSTERS.values() for s in c)
    ] + [{"smiles": "C1CC", "protein": PROT_A, "cell": "CD3D"}])
    out = tmp_path / "p.json"
    assert main(["probe", "build", "--table", str(table), "--out", str(out)]) == 2
    assert "C1CC" in capsys.readouterr().err and not out.exists()
    code = main(["probe", "build", "--table", str(table), "--out", str(out), "--n", "4", "--strategy", "diverse",
                 "--seed", "3", "--skip-invalid"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    probe = Probe.load(out)
    assert summary["n"] == 4 and summary["hash"] == probe.content_hash and summary["skipped"] == 1
    assert probe.strategy == "diverse" and probe.seed == 3
    assert sorted(_cluster_of(s.smiles) for s in probe.samples) == sorted(CLUSTERS)
    assert main(["probe", "show", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == probe.content_hash


def test_cli_probe_build_from_zoo(zoo_dir, tmp_path, capsys):
    from es_merging.cli import main

    out = tmp_path / "z.json"
    assert main(["probe", "build", "--zoo", str(zoo_dir), "--n", "10", "--seed", "1", "--out", str(out)]) == 0
    probe = Probe.load(out)
    assert len(probe.samples) == 10
    assert probe.modalities() == ["molecule", "protein", "cell"]
    assert all(s.descriptors == {} and s.answer is None for s in probe.samples)  # unlabeled
    assert json.loads(capsys.readouterr().out)["n"] == 10
    # reproducible: same seed, same probe
    again = tmp_path / "z2.json"
    assert main(["probe", "build", "--zoo", str(zoo_dir), "--n", "10", "--seed", "1", "--out", str(again)]) == 0
    assert Probe.load(again).content_hash == probe.content_hash
    assert main(["probe", "build", "--zoo", str(tmp_path / "nozoo"), "--n", "3", "--out", str(out)]) == 2
    assert "zoo" in capsys.readouterr().err


def test_cli_probe_build_from_zoo_diverse(zoo_dir, tmp_path, capsys):
    """--strategy diverse is honoured for zoo probes: MaxMin over a larger candidate pool gives drugs
    farther apart than the random probe of the same seed."""
    import numpy as np

    from es_merging.cli import main
    from es_merging.modalities.molecule import morgan_fingerprints, tanimoto_matrix

    paths = {}
    for strategy in ("random", "diverse"):
        paths[strategy] = tmp_path / f"{strategy}.json"
        assert main(["probe", "build", "--zoo", str(zoo_dir), "--n", "12", "--seed", "2", "--strategy", strategy,
                     "--out", str(paths[strategy])]) == 0
        assert json.loads(capsys.readouterr().out)["strategy"] == strategy
    probes = {k: Probe.load(v) for k, v in paths.items()}
    assert len(probes["diverse"].samples) == 12 and probes["diverse"].strategy == "diverse"
    assert probes["diverse"].content_hash != probes["random"].content_hash

    def mean_similarity(probe) -> float:
        sims = tanimoto_matrix(morgan_fingerprints([s.smiles for s in probe.samples]))
        return float(sims[np.triu_indices(len(sims), 1)].mean())

    assert mean_similarity(probes["diverse"]) < mean_similarity(probes["random"])
    assert main(["probe", "build", "--zoo", str(zoo_dir), "--n", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "between 1 and" in capsys.readouterr().err
