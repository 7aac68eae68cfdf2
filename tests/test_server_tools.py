"""In-process MCP tests of every tool (and its error paths), the catalog, resources and prompts."""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from mcp_conftest import anyio_backend, client, fake_expert, fake_merged_model, make_server  # noqa: F401

pytestmark = pytest.mark.anyio

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
INSULIN_B = "FVNQHLCGSHLVEALYLVCGERGFFYTPKT"


def text(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


# ------------------------------------------------------------------------------------- catalog


async def test_catalog_size_names_annotations(make_server):
    from tools import TOOL_NAMES

    server = make_server()
    async with client(server) as c:
        listed = await c.list_tools()
        tools = {t.name: t for t in listed.tools}
        assert sorted(tools) == sorted(TOOL_NAMES)
        wire = listed.model_dump_json(by_alias=True, exclude_none=True)
        assert len(wire.encode()) < 20_000, f"tools/list is {len(wire)} bytes"
        for name, tool in tools.items():
            assert len(name) < 64
            assert tool.title and tool.description and tool.output_schema
            ann = tool.annotations
            assert ann.open_world_hint is False
            assert ann.read_only_hint is not None and ann.idempotent_hint is not None
        read_only = {n for n, t in tools.items() if t.annotations.read_only_hint}
        assert read_only == {"inspect_molecules", "inspect_proteins", "inspect_cell_profiles", "list_experts",
                             "get_job", "list_models", "describe_model", "predict_interaction"}
        assert tools["cancel_job"].annotations.destructive_hint is True
        assert tools["start_merge"].annotations.idempotent_hint is False
        templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
        assert {"esm://models/{model_id}/card", "esm://models/{model_id}/report",
                "esm://models/{model_id}/heatmap.png", "esm://probes/{probe_id}"} <= templates
        assert any(t.startswith("esm://screens/{job_id}/results.csv") for t in templates)
        prompts = {p.name for p in (await c.list_prompts()).prompts}
        assert prompts == {"screen_compound_library", "merge_and_explain", "explain_prediction"}


async def test_unknown_argument_is_an_error(make_server):
    async with client(make_server()) as c:
        r = await c.call_tool("list_experts", {"modalty": "cell"})
        assert r.is_error and "modalty" in text(r)


# ------------------------------------------------------------------------------------- inspect


async def test_inspect_molecules_per_item(make_server):
    async with client(make_server()) as c:
        r = await c.call_tool("inspect_molecules", {"smiles": [ASPIRIN, "C1CC", ""]})
        assert not r.is_error
        out = r.structured_content
        assert (out["n"], out["n_ok"], out["n_failed"]) == (3, 1, 2)
        assert out["items"][0]["descriptors"]["formula"] == "C9H8O4"
        assert out["items"][1]["ok"] is False and out["items"][1]["error"]
        r = await c.call_tool("inspect_molecules", {"smiles": []})
        assert r.is_error


async def test_size_limits(make_server):
    async with client(make_server(max_list=3, max_string=50)) as c:
        r = await c.call_tool("inspect_molecules", {"smiles": ["C"] * 4})
        assert r.is_error and "limit is 3" in text(r)
        r = await c.call_tool("inspect_proteins", {"sequences": ["A" * 51]})
        assert r.is_error and "limit is 50" in text(r)
        r = await c.call_tool("start_screen", {"model": "m", "smiles": ["C"], "cells": [["G"] * 4]})
        assert r.is_error and "limit is 3" in text(r)


async def test_inspect_proteins(make_server):
    async with client(make_server()) as c:
        r = await c.call_tool("inspect_proteins", {"sequences": [INSULIN_B, ">p1\nMKTAYIAKQR", "MKT1AY"],
                                                   "policy": "reject"})
        out = r.structured_content
        assert [i["ok"] for i in out["items"]] == [True, True, False]
        assert "4" in out["items"][2]["error"]  # the position of the digit
        r = await c.call_tool("inspect_proteins", {"sequences": [INSULIN_B], "policy": "guess"})
        assert r.is_error and "policy" in text(r)


async def test_inspect_cells_inline_and_errors(make_server, tmp_path):
    async with client(make_server()) as c:
        r = await c.call_tool("inspect_cell_profiles", {"profiles": [{"CD3E": 5.0, "CD4": 3.0, "MS4A1": 0.0},
                                                                     ["CD19", "MS4A1", "CD79A"], []]})
        out = r.structured_content
        assert [i["ok"] for i in out["items"]] == [True, True, False]
        assert out["items"][1]["descriptors"]["top_genes"][:2] == ["CD19", "MS4A1"]
        r = await c.call_tool("inspect_cell_profiles", {})
        assert r.is_error and "exactly one" in text(r)
        outside = tmp_path / "elsewhere.h5ad"
        outside.write_bytes(b"not really")
        r = await c.call_tool("inspect_cell_profiles", {"h5ad_path": str(outside)})
        assert r.is_error and "outside the allowed roots" in text(r)


async def test_inspect_cells_h5ad(make_server, data_dir):
    h5ad = data_dir / "singlecell" / "pbmc68k_reduced.h5ad"
    async with client(make_server(data_dir=data_dir)) as c:
        r = await c.call_tool("inspect_cell_profiles", {"h5ad_path": str(h5ad), "limit": 3, "top_k": 5})
        assert not r.is_error, text(r)
        assert r.structured_content["n"] == 3
        assert len(r.structured_content["items"][0]["descriptors"]["top_genes"]) == 5


# ------------------------------------------------------------------------------------- probes


async def test_build_probe_inline_table_reuse_and_resource(make_server, tmp_path):
    server = make_server()
    samples = [{"smiles": ASPIRIN, "protein": INSULIN_B, "cell": ["CD3E", "CD4"]},
               {"smiles": "CCO", "protein": "MKTAYIAKQR", "cell": "CD19,MS4A1"},
               {"smiles": "C1CC", "protein": INSULIN_B, "cell": ["CD3E"]}]
    async with client(server) as c:
        r = await c.call_tool("build_probe", {"samples": samples, "name": "p1"})
        assert not r.is_error, text(r)
        out = r.structured_content
        assert out["probe_id"] == "p1" and out["n"] == 2 and out["n_candidates"] == 3
        assert out["skipped"][0]["index"] == 2
        assert any(getattr(b, "type", "") == "resource_link" and b.uri == "esm://probes/p1" for b in r.content)
        again = await c.call_tool("build_probe", {"samples": samples, "name": "p1"})
        assert again.structured_content["reused"] is True
        res = await c.read_resource("esm://probes/p1")
        body = json.loads(res.contents[0].text)
        assert body["summary"]["n"] == 2 and len(body["samples_shown"]) == 2

        table = tmp_path / "inputs" / "probe.csv"
        table.write_text("smiles,protein,cell\n" + f"{ASPIRIN},{INSULIN_B},\"CD3E,CD4\"\nCCO,MKTAYIAKQR,\"CD19\"\n")
        r = await c.call_tool("build_probe", {"table_path": str(table), "strategy": "random", "n": 1})
        assert not r.is_error, text(r)
        assert r.structured_content["n"] == 1 and r.structured_content["probe_id"].startswith("probe-")

        r = await c.call_tool("build_probe", {"from_zoo": True})
        assert r.is_error and "zoo" in text(r)
        r = await c.call_tool("build_probe", {"samples": samples, "from_zoo": True})
        assert r.is_error and "exactly one source" in text(r)
        r = await c.call_tool("build_probe", {"samples": samples, "name": "../evil"})
        assert r.is_error and "probe name" in text(r)
        with pytest.raises(Exception):
            await c.read_resource("esm://probes/nope")


# ------------------------------------------------------------------------------------- experts


async def test_register_and_list_experts(make_server, tmp_path):
    inputs = tmp_path / "inputs"
    mol = fake_expert(inputs, "mol", "molecule")
    fake_expert(inputs, "prot", "protein")
    (inputs / "broken").mkdir()
    outside = fake_expert(tmp_path / "outside", "out", "cell")
    async with client(make_server()) as c:
        r = await c.call_tool("register_expert", {"paths": [str(mol), str(inputs / "prot"), str(inputs / "broken"),
                                                            str(outside), str(inputs / "missing")]})
        out = r.structured_content
        assert [x["ok"] for x in out["results"]] == [True, True, False, False, False]
        assert "adapter_config.json" in out["results"][2]["error"] or "config.json" in out["results"][2]["error"]
        assert "outside the allowed roots" in out["results"][3]["error"]
        assert "does not exist" in out["results"][4]["error"]
        assert out["results"][0]["expert"]["id"] == "mol"
        again = await c.call_tool("register_expert", {"paths": [str(mol)]})
        assert again.structured_content["results"][0]["already_registered"] is True
        named = fake_expert(inputs, "cellx", "cell")
        r = await c.call_tool("register_expert", {"paths": [str(named)], "names": ["my-cell"]})
        assert r.structured_content["results"][0]["expert"]["id"] == "my-cell"
        r = await c.call_tool("register_expert", {"paths": [str(named)], "names": ["a", "b"]})
        assert r.is_error and "names has 2" in text(r)
        r = await c.call_tool("list_experts", {})
        assert [e["id"] for e in r.structured_content["experts"]] == ["mol", "prot", "my-cell"]
        r = await c.call_tool("list_experts", {"modality": "protein"})
        assert [e["id"] for e in r.structured_content["experts"]] == ["prot"]


# ------------------------------------------------------------------------------------- merge (errors)


async def test_start_merge_argument_errors(make_server, tmp_path):
    inputs = tmp_path / "inputs"
    server = make_server()
    async with client(server) as c:
        for name, mod in (("mol", "molecule"), ("prot", "protein")):
            await c.call_tool("register_expert", {"paths": [str(fake_expert(inputs, name, mod))]})
        base = inputs / "base"
        base.mkdir()
        cases = [
            ({"experts": ["mol"]}, "at least 2"),
            ({"experts": ["mol", "nope"], "method": "average", "base": str(base)}, "no such expert"),
            ({"experts": ["mol", "mol"], "method": "average", "base": str(base)}, "twice"),
            ({"experts": ["mol", "prot"], "method": "frobnicate", "base": str(base)}, "unknown merge method"),
            ({"experts": ["mol", "prot"], "method": "ties", "params": {"bogus": 1}, "base": str(base)}, "bogus"),
            ({"experts": ["mol", "prot"], "method": "es", "base": str(base)}, "probe"),
            ({"experts": ["mol", "prot"], "method": "average"}, "base"),
            ({"experts": ["mol", "prot"], "method": "average", "base": str(tmp_path / "outside")}, "outside"),
            ({"experts": ["mol", "prot"], "method": "average", "base": str(base), "out": str(base)}, "exists"),
            ({"experts": ["mol", "prot"], "method": "average", "base": str(base), "name": "bad/name"}, "model name"),
        ]
        for args, needle in cases:
            r = await c.call_tool("start_merge", args)
            assert r.is_error, args
            assert needle in text(r), (args, text(r))


# ------------------------------------------------------------------------------------- jobs


async def test_get_job_waits_with_progress_and_lists(make_server, tmp_path):
    server = make_server()
    async with client(server) as c:
        r = await c.call_tool("get_job", {})
        assert r.structured_content["total"] == 0
        r = await c.call_tool("get_job", {"job_id": "no-such-job"})
        assert r.is_error and "no such job" in text(r)
        final = tmp_path / "home" / "selftest-out"
        job = server.state.runner.submit("selftest", {"steps": 6, "delay": 0.1, "final": str(final)},
                                         staging_parent=final.parent)
        assert len(job["id"]) >= 20  # token_urlsafe(16)
        seen: list[tuple[float, str | None]] = []

        async def on_progress(progress, total, message):
            seen.append((progress, message))

        r = await c.call_tool("get_job", {"job_id": job["id"], "wait_s": 30}, progress_callback=on_progress)
        view = r.structured_content["jobs"][0]
        assert view["state"] == "succeeded", view
        assert view["result"]["steps"] == 6 and Path(view["result"]["path"]).is_dir()
        assert len(list(Path(view["result"]["path"]).iterdir())) == 6
        assert seen and all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))  # monotone progress
        assert any("working" in (m or "") for _, m in seen)
        r = await c.call_tool("get_job", {"limit": 5})
        assert r.structured_content["total"] == 1
        r = await c.call_tool("get_job", {"job_id": "x" * 100})
        assert r.is_error


async def test_failed_job_reports_library_error(make_server, tmp_path):
    server = make_server()
    async with client(server) as c:
        final = tmp_path / "home" / "never"
        job = server.state.runner.submit("selftest", {"steps": 1, "delay": 0, "fail": True, "final": str(final)},
                                         staging_parent=final.parent)
        r = await c.call_tool("get_job", {"job_id": job["id"], "wait_s": 30})
        view = r.structured_content["jobs"][0]
        assert view["state"] == "failed" and "selftest asked to fail" in view["error"]
        assert not final.exists()
        assert not list(final.parent.glob(".esm-job-*"))


async def test_cancel_job_leaves_no_partial_artifact(make_server, tmp_path):
    server = make_server()
    async with client(server) as c:
        r = await c.call_tool("cancel_job", {"job_id": "nope"})
        assert r.is_error
        final = tmp_path / "home" / "cancelled-out"
        job = server.state.runner.submit("selftest", {"steps": 200, "delay": 0.05, "final": str(final)},
                                         staging_parent=final.parent)
        staging = Path(job["staging_dir"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until it has written something
            if staging.exists() and len(list((staging / "out").glob("*"))) >= 2 if (staging / "out").exists() else False:
                break
            time.sleep(0.05)
        assert (staging / "out").exists()
        r = await c.call_tool("cancel_job", {"job_id": job["id"]})
        assert not r.is_error, text(r)
        assert r.structured_content["state"] == "cancelled"
        assert not staging.exists() and not final.exists()
        assert not list(final.parent.glob(".esm-job-*"))
        again = await c.call_tool("cancel_job", {"job_id": job["id"]})
        assert again.structured_content["state"] == "cancelled"


async def test_queued_job_cancelled_before_start(make_server, tmp_path):
    server = make_server(max_jobs=1)
    async with client(server) as c:
        runner = server.state.runner
        first = runner.submit("selftest", {"steps": 100, "delay": 0.05, "final": str(tmp_path / "a")},
                              staging_parent=tmp_path / "home")
        second = runner.submit("selftest", {"steps": 1, "delay": 0, "final": str(tmp_path / "b")},
                               staging_parent=tmp_path / "home")
        assert runner.get(second["id"])["state"] == "queued"
        r = await c.call_tool("cancel_job", {"job_id": second["id"]})
        assert r.structured_content["state"] == "cancelled"
        await c.call_tool("cancel_job", {"job_id": first["id"]})
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------- models


async def test_models_describe_and_resources(make_server, tmp_path):
    server = make_server()
    path = fake_merged_model(tmp_path / "home" / "models")
    async with client(server) as c:
        server.state.store.add_model("merged", name="merged", path=str(path), kind="merged",
                                     meta={"method": "es", "experts": ["mol", "prot"]})
        r = await c.call_tool("list_models", {})
        assert [m["id"] for m in r.structured_content["models"]] == ["merged"]
        r = await c.call_tool("list_models", {"kind": "base"})
        assert r.structured_content["total"] == 0
        r = await c.call_tool("describe_model", {"model_id": "merged"})
        d = r.structured_content
        assert d["method"] == "es" and d["mode"] == "factor" and d["params"] == {"temperature": 0.5}
        assert [e["layers_led"] for e in d["experts"]] == [2, 2]
        assert d["experts"][0]["mean_layer_coefficient"] == pytest.approx(0.4)
        assert d["layer_coefficients"][1] == pytest.approx([0.3, 0.4, 0.8, 0.9])
        assert "esm://models/merged/heatmap.png" in d["resources"]
        assert sum(getattr(b, "type", "") == "resource_link" for b in r.content) == 3
        r = await c.call_tool("describe_model", {"model_id": "ghost"})
        assert r.is_error and "no such model" in text(r)

        card = await c.read_resource("esm://models/merged/card")
        assert card.contents[0].text.startswith("# merged") and card.contents[0].mime_type == "text/markdown"
        report = await c.read_resource("esm://models/merged/report")
        assert json.loads(report.contents[0].text)["timings"]["merge"] == 0.5
        png = await c.read_resource("esm://models/merged/heatmap.png")
        assert png.contents[0].mime_type == "image/png"
        assert base64.b64decode(png.contents[0].blob).startswith(b"\x89PNG")
        with pytest.raises(Exception):
            await c.read_resource("esm://models/ghost/card")
        with pytest.raises(Exception):
            await c.read_resource("esm://models/..%2F..%2Fetc/card")


async def test_predict_and_screen_errors(make_server):
    server = make_server()
    async with client(server) as c:
        r = await c.call_tool("predict_interaction", {"model": "ghost", "items": [{"smiles": "CCO"}]})
        assert r.is_error
        assert "no such model" in text(r) or "not available" in text(r)
        r = await c.call_tool("predict_interaction", {"model": "ghost", "items": []})
        assert r.is_error
        r = await c.call_tool("start_screen", {"model": "ghost"})
        assert r.is_error and "either lists" in text(r)
        r = await c.call_tool("start_screen", {"model": "ghost", "smiles": ["CCO"], "proteins": ["MKT"]})
        assert r.is_error and ("no such model" in text(r) or "not available" in text(r))


async def test_screen_results_resource_pagination(make_server, tmp_path):
    server = make_server()
    async with client(server) as c:
        store = server.state.store
        store.add_job("scr1", "screen", {"rows": 5})
        store.update_job("scr1", state="running")
        store.finish_job("scr1", "succeeded", result={"rows": 5})
        out = tmp_path / "home" / "screens" / "scr1"
        out.mkdir(parents=True)
        (out / "results.csv").write_text("rank,smiles,p\n" + "".join(f"{i},C{i},0.{9 - i}\n" for i in range(5)))
        res = await c.read_resource("esm://screens/scr1/results.csv?offset=1&limit=2")
        lines = res.contents[0].text.strip().splitlines()
        assert lines == ["rank,smiles,p", "1,C1,0.8", "2,C2,0.7"]
        full = await c.read_resource("esm://screens/scr1/results.csv")
        assert len(full.contents[0].text.strip().splitlines()) == 6
        with pytest.raises(Exception):
            await c.read_resource("esm://screens/nope/results.csv")


async def test_prompts_render(make_server):
    async with client(make_server()) as c:
        p = await c.get_prompt("screen_compound_library", {"compounds": f"{ASPIRIN}, CCO", "targets": INSULIN_B,
                                                           "cell_context": "CD8 T cell"})
        body = p.messages[0].content.text
        assert "start_screen" in body and "Compounds (2)" in body
        p = await c.get_prompt("merge_and_explain", {"experts": "zoo-molecule,zoo-protein,zoo-cell"})
        assert "describe_model" in p.messages[0].content.text
        p = await c.get_prompt("explain_prediction", {"model": "m", "smiles": "CCO", "protein": INSULIN_B,
                                                      "cell": "CD3E,CD4"})
        assert "predict_interaction" in p.messages[0].content.text
