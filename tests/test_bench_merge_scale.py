"""`es-merging bench merge-scale` at a tiny size: it runs the real merge in child processes and
produces every JSON key; plus the synthetic checkpoints it builds and the mergekit config it writes."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from es_merging.bench import BENCHES, load_benches
from es_merging.bench.merge_scale import llama_shapes, measure, mergekit_config, write_checkpoints
from es_merging.cli import main

TINY = ["--size-gb", "0.001", "--hidden", "32", "--vocab", "128", "--layers", "2", "--no-mergekit"]


def test_registry_has_merge_scale_and_inspect():
    benches = load_benches()
    assert "merge-scale" in benches and benches is BENCHES
    if Path(__file__).resolve().parents[1].joinpath("es_merging/bench/inspect_bench.py").exists():
        assert "inspect" in benches


def test_bench_merge_scale_tiny_json(tmp_path, capsys):
    out = tmp_path / "ms.json"
    assert main(["bench", "merge-scale", "--json", str(out), *TINY, "--workdir", str(tmp_path / "w")]) == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    for key in ("peak_rss_mb", "peak_rss_doubled_mb", "peak_ratio_doubled", "wall_s", "gb_read_per_s",
                "checkpoint_gb", "largest_tensor_mb", "targets", "runs", "shapes"):
        assert key in res, key
    assert res["shapes"]["layers"] == 2 and res["runs"]["doubled"]["layers"] == 4
    assert 50 < res["peak_rss_mb"] < 4000 and res["wall_s"] > 0
    assert set(res["targets"]) == {"peak_under_1_5_gb", "doubling_within_10pct", "at_most_half_mergekit_time"}
    assert res["targets"]["at_most_half_mergekit_time"] is None  # mergekit not run
    assert list((tmp_path / "w").iterdir()) == []  # checkpoints and outputs cleaned up


def test_bench_suite_form_with_fake_mergekit(tmp_path, capsys):
    """`--suite NAME` dispatches the same way; a stand-in mergekit-yaml shows how it is called."""
    fake = tmp_path / "mergekit-yaml"
    log = tmp_path / "calls.txt"
    fake.write_text(f"#!{sys.executable}\nimport sys, pathlib\n"
                    f"pathlib.Path({str(log)!r}).write_text(' '.join(sys.argv[1:]) + '\\n' + pathlib.Path(sys.argv[1]).read_text())\n"
                    "pathlib.Path(sys.argv[2]).mkdir()\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    args = [a for a in TINY if a != "--no-mergekit"]
    assert main(["bench", "--suite", "merge-scale", *args, "--no-double", "--mergekit-bin", str(fake)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mergekit_wall_s"] > 0 and "wall_ratio_vs_mergekit" in res and "peak_rss_doubled_mb" not in res
    call = log.read_text()
    assert "merge_method: ties" in call and "density: 0.2" in call and "--no-copy-tokenizer" in call


def test_synthetic_checkpoints_are_llama_shaped(tmp_path):
    base, experts = write_checkpoints(tmp_path, experts=2, layers=3, hidden=16, intermediate=48, vocab=64)
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["architectures"] == ["LlamaForCausalLM"]
    b, e = load_file(str(base / "model.safetensors")), load_file(str(experts[0] / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in b.items()} == dict(llama_shapes(3, 16, 48, 64))
    assert 0 < float((e["lm_head.weight"] - b["lm_head.weight"]).abs().mean()) < 0.01


def test_measure_reports_exact_peak_of_the_child():
    res = measure([sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert res["returncode"] == 0 and res["peak_rss_mb"] >= 300


def test_mergekit_config_is_ties_on_the_same_checkpoints():
    text = mergekit_config(Path("/b"), [Path("/e1"), Path("/e2")], 0.2)
    assert text.count("density: 0.2") == 2 and 'base_model: "/b"' in text and "normalize: true" in text
