"""Helpers for the MCP server tests (imported by tests/test_server_*.py; not a test module).

- ``anyio_backend``: the anyio pytest plugin runs ``@pytest.mark.anyio`` tests on asyncio.
- ``make_server``: a server on a fresh data home under tmp_path, bootstrap off, the tmp_path
  ``inputs`` directory as the only extra allowed root (the cwd is not allowed).
- ``selftest`` job kind (registered through the documented ``register_job_kind`` hook): writes
  files step by step into its staging directory; on success the parent moves them to
  ``params["final"]``, like a merge does.
- fake artifacts: a LoRA expert directory and a merged-model directory with the files the
  resources serve.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _selftest_done(runner: Any, row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    final = Path(row["params"]["final"])
    os.replace(result["staged"], final)
    return {"path": str(final), "steps": result["steps"]}


def register_selftest() -> None:
    from server.jobs import register_job_kind

    register_job_kind("selftest", "server.jobs:selftest_work", on_success=_selftest_done, replace=True)


@pytest.fixture
def make_server(tmp_path: Path):
    from server.app import create_server
    from server.settings import Settings

    register_selftest()
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)

    def make(**overrides: Any):
        values: dict[str, Any] = dict(data_home=tmp_path / "home", bootstrap=False, include_cwd=False,
                                      extra_roots=(inputs,), max_jobs=1, worker_threads=1, data_dir=None)
        values.update(overrides)
        return create_server(Settings(**values))

    return make


def client(server: Any):
    from mcp import Client

    return Client(server, cache=None)


def tiny_png() -> bytes:
    """A valid 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"\x00\xff\x00\x00"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def fake_expert(root: Path, name: str, modality: str, base_hash: str = "sha256:" + "0" * 64) -> Path:
    import torch
    from safetensors.torch import save_file

    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2)},
              str(path / "adapter_model.safetensors"))
    (path / "expert.json").write_text(json.dumps({"format": "es-merging-expert/1", "name": name, "kind": "lora",
                                                  "modality": modality, "base_hash": base_hash}))
    return path


def fake_merged_model(root: Path, name: str = "merged") -> Path:
    import torch
    from safetensors.torch import save_file

    path = root / name
    path.mkdir(parents=True)
    (path / "README.md").write_text(f"# {name}\n\nA merged model.\n")
    (path / "report.json").write_text(json.dumps({"timings": {"signals": 1.5, "merge": 0.5}}))
    (path / "layer_coefficients.png").write_bytes(tiny_png())
    (path / "es_merging.json").write_text(json.dumps({  # the shape es_merging.artifact writes
        "format": "es-merging-model/1", "method": {"name": "es", "params": {"temperature": 0.5}}, "mode": "factor",
        "experts": [{"name": "mol", "modality": "molecule"}, {"name": "prot", "modality": "protein"}],
        "probe": {"path": "/x/probe.json", "hash": "sha256:abc"}, "base": {"hash": "sha256:def", "bundled": False},
        "timings": {"signals": 1.5, "merge": 0.5}}))
    lam = torch.tensor([[0.7, 0.6, 0.2, 0.1], [0.3, 0.4, 0.8, 0.9]])
    save_file({"lam": lam}, str(path / "coefficients.safetensors"))
    return path


def write_fake_zoo(out: Path) -> Path:
    """A directory shaped like a built zoo (zoo.json, base/, one fake LoRA expert per modality)."""
    out.mkdir(parents=True)
    (out / "base").mkdir()
    experts = {}
    for modality in ("molecule", "protein", "cell"):
        fake_expert(out, modality, modality, base_hash="sha256:" + "1" * 64)
        experts[modality] = {"path": modality, "modality": modality, "encoder": False}
    (out / "zoo.json").write_text(json.dumps({"base_hash": "sha256:" + "1" * 64, "preset": {"name": "fake"},
                                              "experts": experts}))
    return out


def fake_zoo_work(params: dict, *, progress, cancel, workdir: Path) -> dict:
    """Job target standing in for ``server.jobs:zoo_work`` (runs in the worker process)."""
    for i in range(3):
        progress("train experts", i + 1, 3)
    out = write_fake_zoo(workdir / "zoo")
    return {"staged": str(out)}
