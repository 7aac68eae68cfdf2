"""The two transports: stdio (stdout carries protocol messages only) and streamable HTTP (bearer
token required, DNS-rebinding protection on)."""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mcp_conftest import anyio_backend  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ES_MERGING_DATA_HOME=str(tmp_path / "home"),
               ES_MERGING_BOOTSTRAP="0", PYTHONPATH=str(REPO), **extra)
    env.pop("ES_MERGING_TOKEN", None)
    return env


def test_stdio_stdout_carries_only_protocol_messages(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "es_merging", "serve", "--transport", "stdio", "--no-bootstrap",
         "--data-home", str(tmp_path / "home")],
        cwd=REPO, env=_env(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    err_chunks: list[bytes] = []
    threading.Thread(target=lambda: [lines.put(l) for l in iter(proc.stdout.readline, b"")], daemon=True).start()
    threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True).start()

    def send(msg: dict) -> None:
        proc.stdin.write((json.dumps(msg) + "\n").encode())
        proc.stdin.flush()

    stdout_lines: list[bytes] = []

    def wait_for(msg_id: int) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                raw = lines.get(timeout=0.5)
            except queue.Empty:
                assert proc.poll() is None, b"".join(err_chunks).decode()[-2000:]
                continue
            stdout_lines.append(raw)
            msg = json.loads(raw)
            if msg.get("id") == msg_id:
                return msg
        raise AssertionError(f"no answer to request {msg_id}")

    try:
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "test", "version": "0"}}})
        init = wait_for(1)
        assert init["result"]["serverInfo"]["name"] == "es-merging"
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert len(wait_for(2)["result"]["tools"]) == 13
        # an unparsable SMILES makes RDKit log: that must not reach stdout
        send({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
              "params": {"name": "inspect_molecules", "arguments": {"smiles": ["C1CC", "CCO", "c1cc"]}}})
        result = wait_for(3)["result"]
        assert result["structuredContent"]["n_failed"] == 2
        send({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
              "params": {"name": "get_job", "arguments": {"job_id": "missing"}}})
        assert wait_for(4)["result"]["isError"] is True
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
    while not lines.empty():
        stdout_lines.append(lines.get())
    for raw in stdout_lines:
        msg = json.loads(raw)  # every stdout line is one JSON-RPC message
        assert msg.get("jsonrpc") == "2.0", raw
    stderr = b"".join(err_chunks).decode(errors="replace")
    assert "data home" in stderr  # the logs went to stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.anyio
async def test_http_requires_bearer_token(tmp_path):
    import httpx
    import uvicorn
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from server.app import create_server
    from server.http import build_http_app
    from server.settings import Settings

    token = "test-token-" + "x" * 24
    port = _free_port()
    settings = Settings(data_home=tmp_path / "home", bootstrap=False, transport="http", token=token,
                        host="127.0.0.1", port=port, include_cwd=False)
    app = build_http_app(create_server(settings), settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=10) as h:
            r = await h.post(url, json=init, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            r = await h.post(url, json=init, headers={**headers, "Authorization": "Bearer wrong-token"})
            assert r.status_code == 401
            r = await h.post(url, json=init, headers={**headers, "Authorization": token})  # no scheme
            assert r.status_code == 401
            # right token, foreign Host header: DNS-rebinding protection answers
            r = await h.post(url, json=init, headers={**headers, "Authorization": f"Bearer {token}",
                                                      "Host": "evil.example:80"})
            assert r.status_code in (403, 421)
        http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        async with Client(streamable_http_client(url, http_client=http_client), cache=None) as c:
            tools = await c.list_tools()
            assert len(tools.tools) == 13
            r = await c.call_tool("inspect_molecules", {"smiles": ["CCO"]})
            assert r.structured_content["n_ok"] == 1
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    assert not thread.is_alive()
