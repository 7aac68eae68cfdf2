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
