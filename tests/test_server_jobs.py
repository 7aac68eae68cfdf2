"""Jobs across restarts and shutdowns, the zoo bootstrap, and real merge jobs (when the engine exists)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp_conftest import anyio_backend, client, make_server, write_fake_zoo  # noqa: F401

pytestmark = pytest.mark.anyio


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_restart_keeps_finished_and_interrupts_running(make_server, tmp_path):
    from server.store import Store

    home = tmp_path / "home"
    server = make_server()
    async with client(server) as c:
        final = home / "done-out"
        job = server.state.runner.submit("selftest", {"steps": 2, "delay": 0, "final": str(final)},
                                         staging_parent=home)
        r = await c.call_tool("get_job", {"job_id": job["id"], "wait_s": 30})
        assert r.structured_content["jobs"][0]["state"] == "succeeded"
    # a server that died (kill -9) while its merge ran: its row says running, its staging dir remains
    store = Store(home / "es-merging.sqlite3")
    staging = home / ".esm-job-crashed"
    (staging / "model").mkdir(parents=True)
    store.add_job("crashed", "merge", {"final_out": str(home / "models" / "m")}, staging_dir=str(staging))
    dead = _dead_pid()
    store.update_job("crashed", state="running", stage="merge", done=3, total=10, owner_pid=dead, worker_pid=dead)
    store.close()

    again = make_server()
    async with client(again) as c:
        r = await c.call_tool("get_job", {})
        jobs = {j["job_id"]: j for j in r.structured_content["jobs"]}
        assert r.structured_content["total"] == 2
        assert jobs[job["id"]]["state"] == "succeeded" and jobs[job["id"]]["result"]["steps"] == 2
        assert jobs["crashed"]["state"] == "interrupted" and "start it again" in jobs["crashed"]["next"]
        assert not staging.exists()
        assert final.is_dir()


async def test_a_jobs_printed_output_goes_to_stderr_not_stdout(make_server, tmp_path, capfd):
    """Over stdio the server's stdout is the protocol stream, and job workers inherit it: whatever a
    job prints (Python print or a C-level write to fd 1) must land on stderr."""
    server = make_server()
    async with client(server) as c:
        job = server.state.runner.submit("selftest", {"steps": 1, "delay": 0, "print": "job-says-hello",
                                                      "final": str(tmp_path / "home" / "printed")},
                                         staging_parent=tmp_path / "home")
        r = await c.call_tool("get_job", {"job_id": job["id"], "wait_s": 30})
        assert r.structured_content["jobs"][0]["state"] == "succeeded"
    captured = capfd.readouterr()
    assert "job-says-hello" not in captured.out
    assert "job-says-hello\n" in captured.err and "job-says-hello (fd 1)" in captured.err


async def test_shutdown_interrupts_running_job_and_cleans_up(make_server, tmp_path):
    home = tmp_path / "home"
    server = make_server()
    async with client(server) as c:
        final = home / "slow-out"
        job = server.state.runner.submit("selftest", {"steps": 400, "delay": 0.05, "final": str(final)},
                                         staging_parent=home)
        deadline = time.monotonic() + 30
        while server.state.runner.get(job["id"])["stage"] != "working" and time.monotonic() < deadline:
            await c.call_tool("get_job", {"job_id": job["id"], "wait_s": 0.3})
        pid = server.state.runner.get(job["id"])["worker_pid"]
    # the client closed -> the lifespan closed the state -> the job was stopped
    from server.store import Store

    store = Store(home / "es-merging.sqlite3")
    row = store.get_job(job["id"])
    store.close()
    assert row["state"] == "interrupted"
    assert not final.exists() and not list(home.glob(".esm-job-*"))
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


async def test_bootstrap_builds_zoo_in_background_and_registers_it(make_server, tmp_path):
    from server.jobs import JOB_KINDS, register_job_kind
    from server.bootstrap import _zoo_done

    saved = JOB_KINDS.get("zoo_build")
    register_job_kind("zoo_build", "mcp_conftest:fake_zoo_work", on_success=_zoo_done, replace=True)
    try:
        server = make_server(bootstrap=True, zoo_dir=tmp_path / "home" / "zoo")
        async with client(server) as c:
            job_id = server.state.bootstrap_job
            assert job_id
            r = await c.call_tool("get_job", {"job_id": job_id, "wait_s": 30})
            assert r.structured_content["jobs"][0]["state"] == "succeeded", r.structured_content
            r = await c.call_tool("list_experts", {})
            assert sorted(e["id"] for e in r.structured_content["experts"]) == ["zoo-cell", "zoo-molecule", "zoo-protein"]
            assert r.structured_content["note"] is None
            r = await c.call_tool("list_models", {})
            assert {m["id"]: m["kind"] for m in r.structured_content["models"]}["zoo-base"] == "base"
    finally:
        if saved is None:
            JOB_KINDS.pop("zoo_build", None)
        else:
            JOB_KINDS["zoo_build"] = saved


async def test_bootstrap_registers_an_existing_zoo(make_server, tmp_path):
    zoo = write_fake_zoo(tmp_path / "inputs" / "zoo")
    server = make_server(bootstrap=True, zoo_dir=zoo)
    async with client(server) as c:
        assert server.state.bootstrap_job is None
        r = await c.call_tool("list_experts", {"modality": "cell"})
        assert [e["id"] for e in r.structured_content["experts"]] == ["zoo-cell"]
        assert r.structured_content["experts"][0]["source"] == "zoo"
    # a second start does not register twice
    async with client(make_server(bootstrap=True, zoo_dir=zoo)) as c:
        r = await c.call_tool("list_experts", {})
        assert len(r.structured_content["experts"]) == 3


# ------------------------------------------------------------------------------ with the real zoo


@pytest.fixture
def zoo_server(make_server, zoo_dir):
    return make_server(bootstrap=True, zoo_dir=zoo_dir)


@pytest.mark.slow
async def test_real_merge_job_cancelled_leaves_nothing(zoo_server, tmp_path):
    pytest.importorskip("es_merging.merge_api", reason="the merge engine's API is not in this build yet")
    async with client(zoo_server) as c:
        r = await c.call_tool("build_probe", {"from_zoo": True, "n": 16, "name": "zp"})
        assert not r.is_error, r.content[0].text
        r = await c.call_tool("start_merge", {"experts": ["zoo-molecule", "zoo-protein", "zoo-cell"],
                                              "method": "es", "probe": "zp", "name": "to-cancel"})
        assert not r.is_error, r.content[0].text
        job_id = r.structured_content["job_id"]
        final = tmp_path / "home" / "models" / "to-cancel"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            view = (await c.call_tool("get_job", {"job_id": job_id, "wait_s": 0.5})).structured_content["jobs"][0]
            if view["state"] != "running" or view["stage"] not in (None, "starting"):
                break
        assert view["state"] == "running", view
        r = await c.call_tool("cancel_job", {"job_id": job_id})
        assert r.structured_content["state"] == "cancelled"
        assert not final.exists()
        assert not list(final.parent.glob(".esm-job-*"))
        r = await c.call_tool("list_models", {"kind": "merged"})
        assert r.structured_content["total"] == 0


async def _wait_final(c, job_id: str, budget_s: float = 240) -> dict:
    deadline = time.monotonic() + budget_s
    while True:
        view = (await c.call_tool("get_job", {"job_id": job_id, "wait_s": 20})).structured_content["jobs"][0]
        if view["state"] not in ("queued", "running") or time.monotonic() > deadline:
            return view


@pytest.mark.slow
async def test_zoo_merge_describe_predict_screen(zoo_server, zoo_dir):
    pytest.importorskip("es_merging.merge_api", reason="the merge engine's API is not in this build yet")
    from es_merging.zoo import probe_from_zoo

    world = [s.model_dump(include={"smiles", "protein", "cell"}) for s in probe_from_zoo(zoo_dir, n=4, seed=7).samples]
    async with client(zoo_server) as c:
        r = await c.call_tool("list_experts", {})
        assert sorted(e["id"] for e in r.structured_content["experts"]) == ["zoo-cell", "zoo-molecule", "zoo-protein"]
        r = await c.call_tool("build_probe", {"from_zoo": True, "n": 8, "name": "zp"})
        assert not r.is_error, r.content[0].text
        zp = r.structured_content
        r = await c.call_tool("build_probe", {"from_zoo": True, "n": 8, "strategy": "diverse", "name": "zd"})
        assert not r.is_error, r.content[0].text
        zd = r.structured_content  # MaxMin over a larger pool of the world: another probe
        assert zd["n"] == 8 and zd["n_candidates"] == 64 and zd["hash"] != zp["hash"]
        r = await c.call_tool("start_merge", {"experts": ["zoo-molecule", "zoo-protein", "zoo-cell"], "method": "es",
                                              "probe": "zp", "name": "es-zoo", "bundle_base": False})
        assert not r.is_error, r.content[0].text
        view = await _wait_final(c, r.structured_content["job_id"])
        assert view["state"] == "succeeded", view
        assert view["result"]["model_id"] == "es-zoo"
        # the base referenced by path, not copied (the predictions below load it from the zoo)
        model_dir = Path(zoo_server.state.settings.models_dir) / "es-zoo"
        assert not (model_dir / "base").exists()
        assert json.loads((model_dir / "es_merging.json").read_text())["options"]["bundle_base"] is False
        assert {x["uri"] for x in view["resources"]} >= {"esm://models/es-zoo/heatmap.png"}

        d = (await c.call_tool("describe_model", {"model_id": "es-zoo"})).structured_content
        assert d["method"] == "es" and len(d["experts"]) == 3 and len(d["layer_coefficients"]) == 3
        assert sum(e["layers_led"] for e in d["experts"]) == len(d["layer_coefficients"][0])
        png = await c.read_resource("esm://models/es-zoo/heatmap.png")
        assert png.contents[0].mime_type == "image/png"
        card = await c.read_resource("esm://models/es-zoo/card")
        assert "es" in card.contents[0].text

        r = await c.call_tool("predict_interaction", {"model": "es-zoo", "task": "embedded",
                                                      "items": world[:2] + [{"smiles": "C1CC"}]})
        assert not r.is_error, r.content[0].text
        preds = r.structured_content["predictions"]
        assert preds[0]["ok"] and abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-4
        assert preds[2]["ok"] is False and preds[2]["error"]
        r = await c.call_tool("predict_interaction", {"model": "es-zoo", "task": "nonsense", "items": world[:1]})
        assert r.is_error and "unknown task" in r.content[0].text

        r = await c.call_tool("start_screen", {"model": "es-zoo", "task": "embedded",
                                               "smiles": [w["smiles"] for w in world[:2]],
                                               "proteins": [w["protein"] for w in world[:2]],
                                               "cells": [world[0]["cell"]]})
        assert not r.is_error, r.content[0].text
        view = await _wait_final(c, r.structured_content["job_id"])
        assert view["state"] == "succeeded", view
        assert view["result"]["rows"] == 4 and len(view["result"]["top"]) == 4
        csv_text = (await c.read_resource(view["resources"][0]["uri"])).contents[0].text
        assert len(csv_text.strip().splitlines()) == 5
