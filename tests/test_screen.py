"""Screening: ranking, atomic CSV, row limit, invalid inputs left out, top-N, interruption, CLI."""
from __future__ import annotations

import csv
import json

import pytest

from es_merging.errors import EsMergingError
from es_merging.predict import get_task, load_zoo_model, predict
from es_merging.probe import ProbeSample
from es_merging.screen import screen


@pytest.fixture(scope="module")
def model(zoo_dir):
    return load_zoo_model(zoo_dir, "cell")


@pytest.fixture(scope="module")
def entities(zoo_dir):
    from es_merging.zoo import zoo_world

    world = zoo_world(zoo_dir)
    return {
        "smiles": [e.raw for e in world.heldout["molecule"][:3]],
        "proteins": [(f"P{i}", e.raw) for i, e in enumerate(world.heldout["protein"][:2])],
        "cells": [(f"C{i}", list(e.raw)) for i, e in enumerate(world.heldout["cell"][:2])],
    }


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_screen_ranks_and_writes_atomically(model, entities, tmp_path):
    out = tmp_path / "ranked.csv"
    seen = []
    res = screen(model, "triple_effect", out=out, option="Weak effect", progress=lambda *a: seen.append(a),
                 **entities)
    assert res.rows == res.product == res.written == 12 and not res.invalid
    rows = _rows(out)
    assert list(rows[0]) == ["rank", "drug", "protein", "cell", "p_Strong effect", "p_Weak effect",
                             "p_No effect", "choice"]
    assert [int(r["rank"]) for r in rows] == list(range(1, 13))
    p = [float(r["p_Weak effect"]) for r in rows]
    assert p == sorted(p, reverse=True)
    assert {(r["drug"], r["protein"], r["cell"]) for r in rows} == {
        (d, pn, cn) for d in entities["smiles"] for pn, _ in entities["proteins"] for cn, _ in entities["cells"]}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ranked.csv"]  # no temp or spool file left
    assert seen[-1] == ("screen", 12, 12)
    # the probabilities are predict()'s, row for row
    d, (pn, pseq), (cn, cgenes) = entities["smiles"][0], entities["proteins"][1], entities["cells"][0]
    ref = predict(model, [ProbeSample(smiles=d, protein=pseq, cell=cgenes)], "triple_effect")[0]
    row = next(r for r in rows if (r["drug"], r["protein"], r["cell"]) == (d, pn, cn))
    assert float(row["p_Weak effect"]) == pytest.approx(ref.probabilities["Weak effect"], rel=1e-4)
    # top-N from the bounded heap = the head of the full ranking
    res2 = screen(model, "triple_effect", out=tmp_path / "top.csv", option="Weak effect", top_n=4, **entities)
    assert res2.written == 4
    assert [(r["drug"], r["protein"], r["cell"]) for r in _rows(tmp_path / "top.csv")] == \
           [(r["drug"], r["protein"], r["cell"]) for r in rows[:4]]


def test_screen_refuses_over_limit(tmp_path):
    with pytest.raises(EsMergingError, match=r"12 rows .*3 drugs x 2 proteins x 2 cells.*limit of 10"):
        screen(None, "triple_effect", out=tmp_path / "x.csv", smiles=["C", "CC", "CCC"],
               proteins=["MKV", "MKT"], cells=["CD3D,CD3E", "CD14,LYZ"], limit=10)
    assert not list(tmp_path.iterdir())


def test_screen_leaves_out_invalid_inputs(model, entities, tmp_path):
    smiles = entities["smiles"][:2] + ["C1CC"]
    res = screen(model, "dti", out=tmp_path / "r.csv", smiles=smiles, proteins=entities["proteins"])
    assert res.product == 6 and res.rows == 4
    assert res.invalid[0]["kind"] == "drug" and res.invalid[0]["name"] == "C1CC"
    assert len(_rows(tmp_path / "r.csv")) == 4


def test_screen_usage_errors(model, entities, tmp_path):
    with pytest.raises(EsMergingError, match="not an answer"):
        screen(model, "dti", out=tmp_path / "a.csv", smiles=entities["smiles"], proteins=entities["proteins"],
               option="Maybe")
    with pytest.raises(EsMergingError, match="needs at least one protein"):
        screen(model, "dti", out=tmp_path / "a.csv", smiles=entities["smiles"])
    with pytest.raises(EsMergingError, match="not both"):
        screen(model, "embedded", out=tmp_path / "a.csv", smiles=entities["smiles"], triples=[{"smiles": "C"}])
    from es_merging.predict import Task

    mol_only = Task(name="m", question="Is it drug-like?", options=("Yes", "No"), modalities=("molecule",))
    with pytest.raises(EsMergingError, match="does not use proteins"):
        screen(model, mol_only, out=tmp_path / "a.csv", smiles=entities["smiles"], proteins=entities["proteins"])
    assert not list(tmp_path.iterdir())


def test_interrupted_screen_leaves_nothing(model, entities, tmp_path):
    def stop(stage, done, total):
        if stage == "screen":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        screen(model, "triple_effect", out=tmp_path / "r.csv", progress=stop, **entities)
    assert not list(tmp_path.iterdir())


def test_explicit_triples(model, entities, tmp_path):
    (pn, pseq), (cn, cg) = entities["proteins"][0], entities["cells"][0]
    triples = [{"smiles": s, "protein": pseq, "cell": ",".join(cg)} for s in entities["smiles"]]
    res = screen(model, "embedded", out=tmp_path / "t.csv", triples=triples)
    assert res.rows == 3 and res.option == get_task("embedded").positive_option


def test_screen_cli(zoo_dir, entities, tmp_path, capsys):
    from es_merging.cli import main

    smi = tmp_path / "drugs.smi"
    smi.write_text("".join(f"{s} drug{i}\n" for i, s in enumerate(entities["smiles"])))
    fasta = tmp_path / "targets.fasta"
    fasta.write_text("".join(f">{n} some protein\n{s}\n" for n, s in entities["proteins"]))
    out = tmp_path / "ranked.csv"
    rc = main(["screen", "--zoo", str(zoo_dir), "--expert", "base", "--task", "dti", "--smiles-file", str(smi),
               "--proteins-file", str(fasta), "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 6 and summary["option"] == "Interacts"
    rows = _rows(out)
    assert {r["drug"] for r in rows} == {"drug0", "drug1", "drug2"} and {r["protein"] for r in rows} == {"P0", "P1"}
    rc = main(["screen", "--zoo", str(zoo_dir), "--task", "dti", "--smiles-file", str(smi),
               "--proteins-file", str(fasta), "--out", str(tmp_path / "x.csv"), "--limit", "5"])
    assert rc == 2 and "row limit" in capsys.readouterr().err
