"""The embedded suite end to end on the test-preset zoo with one seed (the full method set), its
JSON contract and the Markdown generated from it; the screen bench's fit on a tiny run."""
from __future__ import annotations

import json
import math

import pytest

from es_merging.bench.embedded import MERGE_METHODS, parse_methods, render_markdown


def test_parse_methods():
    full = parse_methods(None)
    assert ("base", None) in full and ("finetuned", None) in full
    assert {(m, mode) for m in MERGE_METHODS for mode in ("factor", "delta")} <= set(full)
    assert parse_methods("experts,es:delta,average") == [
        ("molecule", None), ("protein", None), ("cell", None), ("es", "delta"), ("average", "factor"),
        ("average", "delta")]
    with pytest.raises(Exception, match="unknown entry"):
        parse_methods("magic")


def test_embedded_suite_end_to_end(zoo_dir, tmp_path, capsys):
    from es_merging.cli import main

    out_json, out_md = tmp_path / "embedded.json", tmp_path / "embedded.md"
    rc = main(["bench", "--suite", "embedded", "--zoo", str(zoo_dir), "--seeds", "1", "--n", "16",
               "--probe-n", "16", "--finetune-steps", "8", "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    capsys.readouterr()
    data = json.loads(out_json.read_text())
    assert data["seeds"] == [0] and data["preset"] == "test"
    rows = {(r["method"], r["mode"]): r for r in data["results"]}
    assert set(rows) == set(parse_methods(None))  # the full set ran
    assert not [r["error"] for r in data["results"] if r.get("error")]
    for r in data["results"]:
        for metric in ("accuracy", "macro_f1", "auroc"):
            v = r["interactive"][metric]
            assert v is None or 0.0 <= v <= 1.0
            assert r["interactive"]["sd"][metric] in (0.0, None)
        assert set(r["preservation"]) == set(r["preservation_ratio"]) == {"molecule", "protein", "cell"}
        assert all(0.0 <= v <= 1.0 for v in r["preservation"].values())
    # each expert's ratio on its own modality is 1 by definition (when it is away from chance)
    for m in ("molecule", "protein", "cell"):
        ratio = rows[(m, None)]["preservation_ratio"][m]
        assert ratio is None or math.isclose(ratio, 1.0)
    assert rows[("finetuned", None)]["per_seed"][0]["training"]["steps"] == 8
    md = out_md.read_text()
    assert md == render_markdown(data)
    assert md.count("\n| ") == len(data["results"]) + 1 and "es | delta" in md


def test_screen_bench_small(zoo_dir):
    from es_merging.bench.screen_bench import linear_fit, run_screen_bench

    fit = linear_fit([1, 2, 3], [2.0, 4.0, 6.0])
    assert fit["seconds_per_row"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    data = run_screen_bench(zoo=str(zoo_dir), expert="molecule", sizes=[25, 50])
    assert [r["rows"] for r in data["runs"]] == [25, 50]
    assert data["predictions_per_second"] > 0 and "r2" in data["fit"]


# ----------------------------------------------------------------------------- real-data suite pieces
def test_cold_drug_split_shares_no_drug():
    from es_merging.bench.real import cold_drug_split

    drugs = [f"d{i % 17}" for i in range(200)]
    for seed in range(5):
        train, test = cold_drug_split(drugs, test_fraction=0.3, seed=seed)
        assert not set(train) & set(test)
        assert set(train) | set(test) == set(drugs) and len(test) == 5
    assert cold_drug_split(drugs, seed=1) == cold_drug_split(drugs, seed=1)
    assert cold_drug_split(drugs, seed=1) != cold_drug_split(drugs, seed=2)


def test_real_datasets_cold_split(data_dir):
    from es_merging.bench.real import cold_drug_split, load_davis, stratified_sample

    pairs = load_davis(data_dir, crop=64)
    assert len(pairs) == 30056 and all(len(p.protein) <= 64 for p in pairs)
    train_drugs, test_drugs = cold_drug_split([p.drug for p in pairs], seed=0)
    test = stratified_sample([p for p in pairs if p.drug in set(test_drugs)], 40, 0, ["Interacts", "Does not interact"])
    train = stratified_sample([p for p in pairs if p.drug in set(train_drugs)], 40, 0, ["Interacts", "Does not interact"])
    assert not {p.drug for p in train} & {p.drug for p in test}
    assert sum(p.label == "Interacts" for p in test) == 20


def test_logistic_head_and_features(zoo_dir):
    import numpy as np

    from es_merging.bench.real import logistic_head
    from es_merging.predict import features, load_zoo_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = (x[:, 0] > 0).astype(int)
    probs = logistic_head(x[:40], y[:40], x[40:], 2)
    assert np.allclose(probs.sum(1), 1.0) and ((probs[:, 1] > 0.5) == y[40:].astype(bool)).mean() > 0.9
    model = load_zoo_model(zoo_dir, "molecule")
    feats, errors = features(model, [{"smiles": "CCO", "protein": "MKTAYIAKQR"}, {"smiles": "C1CC", "protein": "MK"}],
                             "dti")
    assert feats.shape == (2, model.config.hidden_size) and errors[0] is None and "C1CC" in errors[1]
    assert np.abs(feats[0]).sum() > 0 and not feats[1].any()


def test_real_suite_end_to_end_small(data_dir, zoo_dir):
    from es_merging.bench.real import render_markdown, run_suite

    data = run_suite(data_dir=data_dir, zoo=str(zoo_dir), seeds=1, datasets=["davis", "gdsc"],
                     models="base,average:factor", n_train=12, n_test=8, k=2, protein_crop=48, adapt=False)
    assert {(r["method"], r["dataset"], r["protocol"]) for r in data["results"]} == {
        (m, d, p) for m in ("base", "average") for d in ("davis", "gdsc") for p in ("kshot", "head")}
    assert not [r for r in data["results"] if r.get("error")]
    for r in data["results"]:
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
        assert r["per_seed"][0].get("failed", 0) == 0
    assert data["splits"]["davis"][0]["n_test"] == 8 and data["adaptation"]["enabled"] is False
    assert "**davis**" in render_markdown(data)
