"""`es-merging merge` end to end on tiny synthetic checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from es_merging.cli import main
from es_merging.engine import reference_merge
from es_merging.experts import load_expert_spec
from es_merging.methods.base import get_method
from test_engine import REPO_ROOT, assert_bitwise, load_dir, zoo  # noqa: F401  (zoo is a fixture)


def test_cli_merge_end_to_end_subprocess(zoo, tmp_path):
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "es_merging", "merge", "--base", str(zoo["base"]),
           "--experts", str(zoo["mol"]), str(zoo["prot"]), str(zoo["cell"]),
           "--method", "dare_ties", "--set", "density=0.5", "--seed", "7", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["out"] == str(out) and summary["mode"] == "factor"
    assert summary["method"] == {"name": "dare_ties", "params": {"density": 0.5, "scaling": 1.0}}
    n = len(load_file(str(zoo["mol"] / "adapter_model.safetensors")))
    assert f"{n}/{n}" in proc.stderr and f"{n}/{n}" not in proc.stdout  # progress goes to stderr only
    specs = [load_expert_spec(p) for p in (zoo["mol"], zoo["prot"], zoo["cell"])]
    ref = reference_merge(zoo["base"], specs, get_method("dare_ties", density=0.5), seed=7)
    assert_bitwise(load_file(str(out / "adapter_model.safetensors")), ref)
    assert json.loads((out / "es_merging.json").read_text())["seeds"]["seed"] == 7


def test_cli_delta_rank_and_overwrite(zoo, tmp_path, capsys):
    out = tmp_path / "r2"
    args = ["merge", "--base", str(zoo["base"]), "--experts", str(zoo["mol"]), str(zoo["rank8"]),
            "--method", "average", "--mode", "delta", "--rank", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rank"] == 2 and summary["backbone"]["format"] == "adapter"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert main(args) == 2  # exists
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert main(args + ["--overwrite"]) == 0
    assert (out / "base").is_dir()  # a small base is bundled by default
    assert main(args + ["--overwrite", "--no-bundle-base"]) == 0
    manifest = json.loads((out / "es_merging.json").read_text())
    assert not (out / "base").exists() and manifest["options"]["bundle_base"] is False


def test_cli_dense_experts_default_to_delta(zoo, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["merge", "--base", str(zoo["base"]), "--experts", str(zoo["dense1"]), str(zoo["dense2"]),
                 "--method", "ties", "--set", "density=0.2", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "delta" and summary["backbone"]["format"] == "dense"
    base = load_file(str(zoo["base"] / "model.safetensors"))
    got = load_dir(out)
    assert sorted(got) == sorted(base) and not torch.equal(got["lm_head.weight"], base["lm_head.weight"])


def test_cli_errors_are_one_line_and_leave_nothing(zoo, tmp_path, capsys):
    base_args = ["merge", "--base", str(zoo["base"]), "--experts", str(zoo["mol"]), str(zoo["prot"]), "--quiet"]
    assert main(base_args + ["--method", "es", "--out", str(tmp_path / "a")]) == 2
    assert "--probe" in capsys.readouterr().err
    assert main(base_args + ["--method", "ties", "--set", "density", "--out", str(tmp_path / "b")]) == 2
    assert "name=value" in capsys.readouterr().err
    assert main(base_args + ["--method", "ties", "--set", "density=3", "--out", str(tmp_path / "c")]) == 2
    assert "above its maximum" in capsys.readouterr().err
    assert main(base_args + ["--method", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown merge method" in capsys.readouterr().err
    assert main(["merge", "--method", "ties"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(base_args + ["--method", "average", "--mode", "factor", "--rank", "2", "--out", str(tmp_path / "e")]) == 2
    assert "--rank" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_list_methods(capsys):
    assert main(["merge", "--list-methods"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"es", "es_layer", "es_element", "average", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(methods)
    assert methods["es"]["needs_probe"] is True
    assert any(p["name"] == "density" and p["default"] == 0.2 for p in methods["ties"]["params"])
