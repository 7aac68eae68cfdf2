"""`es-merging adapt`: labelling rules on known real entities, the adapted zoo's layout and record,
reproducibility, a bad data directory, and the real-data suite with adaptation (test preset)."""
from __future__ import annotations

import filecmp
import json

import pytest

from es_merging.adapt import cell_lineage, protein_family, protein_view
from es_merging.errors import EsMergingError
from es_merging.zoo.world import MODALITIES, molecule_descriptor


# ----------------------------------------------------------------------------- rules, no data needed
def test_protein_rules_and_view():
    # the world's kinase motif inside a Ser/Thr-kinase catalytic loop (PS00108), padded
    seq = "A" * 50 + "VIYRDLKPENLLL" + "G" * 50
    fam, start, end, pid = protein_family(seq)
    assert (fam, pid) == ("kinase", "PS00108") and seq[start:end] == "VIYRDLKPENLLL"
    view = protein_view(seq, 32)
    assert len(view) == 32 and "VIYRDLKPENLLL" in view
    assert protein_family("M" + "A" * 40) is None and protein_view("M" + "A" * 40, 8) == "A" * 8  # central crop
    assert protein_view("MKV", 32) == "MKV"
    # a kinase loop and a trypsin serine site in one sequence: two families -> unlabelled
    assert protein_family("VIYRDLKPENLLL" + "W" * 10 + "DSCQGDSGGPLV") is None
    assert cell_lineage("Acute Myeloid Leukemia") == "monocyte" and cell_lineage("Burkitt's Lymphoma") == "B-cell"
    assert cell_lineage("Plasma Cell Myeloma") is None and cell_lineage(None) is None


# ----------------------------------------------------------------------------- rules on the real data
def test_real_labels_on_known_entities(data_dir):
    import pandas as pd

    from es_merging.adapt import load_real_entities
    from es_merging.bench.real import _cell_genes

    davis = pd.read_csv(data_dir / "davis" / "davis_targets.csv")
    seqs = dict(zip(davis.target_id, davis.sequence))
    fam, *_, pid = protein_family(seqs["ABL1"])
    assert (fam, pid) == ("kinase", "PS00109")  # tyrosine kinase: HRDLAARN
    assert "HRDLAARN" in protein_view(seqs["ABL1"], 32)
    assert protein_family(seqs["AKT1"])[0] == "kinase" and "YRDLKLEN" in protein_view(seqs["AKT1"], 32)
    triple = pd.read_csv(data_dir / "triple" / "target_sequences.csv").dropna(subset=["sequence"])
    tseq = dict(zip(triple.gene_symbol, triple.sequence))
    assert protein_family(tseq["PARP1"]) is None and protein_family(tseq["HDAC1"]) is None
    assert protein_family(tseq["EGFR"])[0] == "kinase"

    drugs = pd.read_csv(data_dir / "gdsc" / "gdsc2_drugs.csv")
    smiles = dict(zip(drugs.drug_id, drugs.smiles))
    assert molecule_descriptor(smiles["Lapatinib"]) == "lipophilic"  # Crippen LogP 6.1
    assert molecule_descriptor(smiles["Gemcitabine"]) == "hydrophilic"  # -1.3
    assert molecule_descriptor(smiles["Olaparib"]) is None  # 2.35: the ambiguous middle

    real = load_real_entities(data_dir, protein_window=32, cell_genes=32)
    counts = real.counts()
    assert counts["molecule"] == {"hydrophilic": 19, "lipophilic": 149} and real.unlabelled["molecule"] == 51
    assert counts["protein"] == {"kinase": 318, "protease": 0, "receptor": 0}
    assert len(real.non_kinases) == 30 and protein_view(tseq["PARP1"], 32) in real.non_kinases
    assert counts["cell"] == {"T-cell": 13, "B-cell": 31, "monocyte": 17} and real.unlabelled["cell"] == 519
    by_raw = {m: {e.raw: e.descriptor for e in es} for m, es in real.entities.items()}
    assert by_raw["protein"][protein_view(seqs["ABL1"], 32)] == "kinase"
    assert all(len(e.raw) == 32 for e in real.entities["protein"])
    genes = _cell_genes(data_dir, 32)  # the suite's own cell inputs
    assert by_raw["cell"][genes["ACH-000002"]] == "monocyte"  # HL-60, AML
    assert by_raw["cell"][genes["ACH-000995"]] == "T-cell"  # Jurkat, T-ALL
    assert by_raw["cell"][genes["ACH-000654"]] == "B-cell"  # Raji, Burkitt's
    assert genes["ACH-000019"] not in by_raw["cell"]  # MCF7, breast
    assert set(real.data_files) == {"davis/davis_dti.csv.gz", "gdsc/gdsc2_response.csv", "gdsc/gdsc2_drugs.csv",
                                    "triple/target_sequences.csv", "gdsc/gdsc_expression_zscore_580x706.csv",
                                    "gdsc/gdsc_cell_lines.csv"}


def test_split_is_seeded_stratified_and_disjoint():
    from es_merging.adapt import split_entities
    from es_merging.zoo.world import Entity

    ents = [Entity("cell", (f"G{i}",), "T-cell" if i < 8 else "B-cell") for i in range(20)]
    tr, ho = split_entities(ents, heldout_fraction=0.25, seed=3)
    assert not {e.raw for e in tr} & {e.raw for e in ho} and len(tr) + len(ho) == 20
    assert sum(e.descriptor == "T-cell" for e in ho) == 2 and sum(e.descriptor == "B-cell" for e in ho) == 3
    assert split_entities(ents, heldout_fraction=0.25, seed=3) == (tr, ho)
    assert split_entities(ents, heldout_fraction=0.25, seed=4) != (tr, ho)


# ----------------------------------------------------------------------------- the adapted zoo
def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_adapt_zoo_layout_record_and_reproducibility(data_dir, zoo_dir, tmp_path):
    import torch

    from es_merging.adapt import adapt_zoo
    from es_merging.experts import base_hash, load_expert_spec
    from es_merging.predict import load_zoo_model

    kw = dict(steps=3, seed=5, threads=1, eval_world_n=0, heldout_fraction=0.05)
    first = adapt_zoo(zoo_dir, data_dir, tmp_path / "a", **kw)
    second = adapt_zoo(zoo_dir, data_dir, tmp_path / "b", **kw)
    digest = base_hash(zoo_dir / "base")
    assert base_hash(tmp_path / "a" / "base") == digest and first["base"]["mode"] == "symlink"
    for m in MODALITIES:
        spec = load_expert_spec(tmp_path / "a" / m)
        assert spec.base_hash == digest and spec.modality == m and spec.kind == "lora"
        assert (spec.encoder_dir is not None) == (m != "cell")
        if spec.encoder_dir is not None:  # frozen encoders travel unchanged
            assert filecmp.cmp(spec.encoder_dir / "model.safetensors", zoo_dir / m / "encoder" / "model.safetensors",
                               shallow=False)
        rec = spec.meta["adaptation"]
        assert rec["seed"] == 5 and rec["steps"] == 3 and rec["source_expert"] == str((zoo_dir / m).resolve())
        assert rec["source_weights"].startswith("sha256:") and "gdsc/gdsc_cell_lines.csv" in rec["data_files"]
        assert rec["labels"]["labelled"] == first["labels"][m]["labelled"]
        assert set(rec["heldout_real"]) == {"before", "after"}
        a, b, src = _tensors(tmp_path / "a" / m), _tensors(tmp_path / "b" / m), _tensors(zoo_dir / m)
        assert a.keys() == b.keys() == src.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{m}: same seed, different adapter"
        assert any(not torch.equal(a[k], src[k]) for k in a), f"{m}: adapter unchanged by adaptation"
        assert first["experts"][m]["weights"] == second["experts"][m]["weights"] != first["experts"][m]["source_weights"]
        ho = first["experts"][m]["heldout_real"]
        assert ho["before"]["n"] == ho["after"]["n"] == sum(first["labels"][m]["heldout"].values()) > 0
    assert first["labels"]["protein"]["descriptors_without_real_entities"] == ["protease", "receptor"]
    control = first["experts"]["protein"]["real_non_kinase_targets"]
    assert control["before"]["n"] == 30 and sum(control["after"]["called"].values()) == pytest.approx(1.0, abs=1e-3)
    assert first["task_labels_used"] is False
    report = json.loads((tmp_path / "a" / "zoo.json").read_text())
    assert report["adaptation"]["seed"] == 5 and report["adapted_from"] == str(zoo_dir.resolve())
    model = load_zoo_model(tmp_path / "a", "protein")  # the zoo load path accepts the adapted zoo
    assert model.active_adapter == "protein"
    # the real suite takes an already-adapted zoo as it is, if its inputs match the suite's
    from es_merging.bench.real import _adapted_zoo

    path, rec = _adapted_zoo(tmp_path / "a", data_dir, tmp_path, adapt=True, steps=None, seed=0, protein_crop=32,
                             cell_genes=32)
    assert path == tmp_path / "a" and rec["done_by"].startswith("the given zoo") and rec["seed"] == 5
    with pytest.raises(EsMergingError, match="--protein-crop 32"):
        _adapted_zoo(tmp_path / "a", data_dir, tmp_path, adapt=True, steps=None, seed=0, protein_crop=48, cell_genes=32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_adapt_refuses_bad_inputs_and_writes_nothing(data_dir, zoo_dir, tmp_path, capsys):
    from es_merging.adapt import adapt_zoo
    from es_merging.cli import main

    bad = tmp_path / "bad-data"
    bad.mkdir()
    (bad / "SOURCES.md").write_text("not the datasets\n")
    with pytest.raises(EsMergingError, match="davis_dti.csv.gz"):
        adapt_zoo(zoo_dir, bad, tmp_path / "out", steps=1, threads=1)
    assert main(["adapt", "--zoo", str(zoo_dir), "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "out"), "--steps", "1"]) == 2
    assert "data directory" in capsys.readouterr().err
    with pytest.raises(EsMergingError, match="outside the source zoo"):
        adapt_zoo(zoo_dir, data_dir, zoo_dir / "adapted", steps=1, threads=1)
    (tmp_path / "taken").mkdir()
    with pytest.raises(EsMergingError, match="already exists"):
        adapt_zoo(zoo_dir, data_dir, tmp_path / "taken", steps=1, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-data", "taken"]
    assert not (zoo_dir / "adapted").exists()


def test_adapt_interrupted_leaves_nothing(data_dir, zoo_dir, tmp_path, monkeypatch):
    import es_merging.zoo.train as train
    from es_merging.adapt import adapt_zoo

    real_train = train.train_experts
    calls = []

    def failing(model, world, experts, **kw):  # the second expert's training fails
        calls.append(experts)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_train(model, world, experts, **kw)

    monkeypatch.setattr(train, "train_experts", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        adapt_zoo(zoo_dir, data_dir, tmp_path / "out", steps=1, threads=1, eval_world_n=0, heldout_fraction=0.05)
    assert calls == [["molecule"], ["protein"]] and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the real suite, adapted
def test_real_suite_with_adaptation(data_dir, zoo_dir):
    from es_merging.bench.real import render_markdown, run_suite

    data = run_suite(data_dir=data_dir, zoo=str(zoo_dir), seeds=1, datasets=["davis"], models="molecule,average:factor",
                     n_train=12, n_test=8, k=2, protocols=("head",), adapt_steps=2, adapt_seed=3)
    rec = data["adaptation"]
    assert rec["enabled"] and rec["done_by"] == "this suite run" and rec["seed"] == 3 and rec["steps"] == 2
    assert rec["protein_window"] == data["protocol"]["protein_crop"] == 32
    for m in MODALITIES:
        e = rec["experts"][m]
        assert e["weights"] != e["source_weights"]
        assert {"before", "after"} <= set(e["heldout_real"]) and e["heldout_real"]["after"]["n"] > 0
    assert {(r["method"], r["protocol"]) for r in data["results"]} == {("molecule", "head"), ("average", "head")}
    assert not [r for r in data["results"] if r.get("error")]
    assert data["timings_s"]["adaptation"] > 0
    assert "2 steps per expert, seed 3" in render_markdown(data)
