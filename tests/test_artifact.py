"""The merged-model directory (DESIGN section 5), run_merge and load_model."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import es_merging.merge_api as merge_api
from es_merging.artifact import MANIFEST, load_model, read_manifest
from es_merging.engine import plan_merge, reference_merge
from es_merging.errors import ExpertError, MergeError
from es_merging.experts import load_expert_spec
from es_merging.methods.base import get_method
from es_merging.options import MergeOptions
from test_engine import assert_bitwise, load_dir, synthetic_signals, zoo  # noqa: F401  (zoo is a fixture)

HAS_MLLM = importlib.util.find_spec("es_merging.mllm") is not None
needs_mllm = pytest.mark.skipif(not HAS_MLLM, reason="es_merging.mllm (MultimodalModel) has not landed yet")


@pytest.fixture
def fake_signals(monkeypatch):
    """Replace the probe forward passes by synthetic signals (the engine and artifact are under test)."""
    made = {}

    def fake(opts, experts, method, mode, progress):
        plan = plan_merge(opts.base, experts, mode=mode)
        made["signals"] = synthetic_signals(plan, seed=2)
        made["signals"].meta.update(seed=opts.seed, probe="synthetic")
        progress("signals", 1, 1)
        return made["signals"]

    monkeypatch.setattr(merge_api, "_signals", fake)
    return made


def _probe(tmp_path: Path) -> Path:
    p = tmp_path / "probe.json"
    p.write_text(json.dumps({"samples": []}))
    return p


def test_es_artifact_has_every_file(zoo, tmp_path, fake_signals):
    experts = [zoo["mol"], zoo["prot"], zoo["cell"]]
    stages = []
    opts = MergeOptions(base=zoo["base"], experts=experts, method="es", probe=_probe(tmp_path),
                        out=tmp_path / "merged", seed=11, params={"temperature_layer": 0.7})
    res = merge_api.run_merge(opts, progress=lambda s, d, t: stages.append(s))
    out = tmp_path / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"es_merging.json", "adapter_config.json", "adapter_model.safetensors", "base", "encoders",
            "coefficients.safetensors", "report.json", "layer_coefficients.png", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "probe.json"]  # no temp dir left
    assert {"plan", "signals", "merge", "write"} <= set(stages)
    # encoder copied from its owning expert
    assert (out / "encoders" / "molecule" / "model.safetensors").read_bytes() == (zoo["mol"] / "encoder" / "model.safetensors").read_bytes()
    # the weights equal the in-memory reference merge with the same signals and seed
    specs = [load_expert_spec(p) for p in experts]
    ref = reference_merge(zoo["base"], specs, get_method("es", temperature_layer=0.7), seed=11, signals=fake_signals["signals"])
    assert_bitwise(load_file(str(out / "adapter_model.safetensors")), ref)
    m = read_manifest(out)
    assert m == res.manifest
    assert m["seeds"]["seed"] == 11 and m["method"] == {"name": "es", "params": get_method("es", temperature_layer=0.7).values}
    assert set(m["versions"]) >= {"torch", "transformers", "peft", "safetensors", "es_merging"}
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] or m["versions"]["torch"] == torch.__version__
    assert [e["name"] for e in m["experts"]] == ["mol", "prot", "cell"]
    assert all(e["weights_hash"].startswith("sha256-tensors:") for e in m["experts"])
    assert m["experts"][0]["encoder_hash"].startswith("sha256:")
    assert m["probe"]["hash"].startswith("sha256:") and m["base"]["bundled"] is True
    assert set(m["timings"]) == {"plan", "signals", "merge", "write"} and m["created_at"]
    # coefficients: lam and one element tensor per layer tensor
    coef = load_file(str(out / "coefficients.safetensors"))
    assert torch.equal(coef["lam"], fake_signals["signals"].lam)
    assert sum(k.startswith("element/") for k in coef) == len(ref)
    report = json.loads((out / "report.json").read_text())
    assert report["lambda"][1]["expert"] == "prot" and len(report["lambda"][1]["lambda"]) == 2
    assert len(report["tensors"]) == len(ref) and set(report["timings"]) == set(m["timings"])
    png = (out / "layer_coefficients.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    import matplotlib.image

    h, w = matplotlib.image.imread(str(out / "layer_coefficients.png")).shape[:2]
    assert w > h > 100
    card = (out / "README.md").read_text()
    assert "| expert | L0 | L1 |" in card and "es_merging.load_model(\"merged\")" in card


def test_baseline_dense_artifact(zoo, tmp_path):
    opts = MergeOptions(base=zoo["base"], experts=[zoo["dense1"], zoo["dense2"]], method="ties", out=tmp_path / "d",
                        params={"density": 0.5}, shard_size_mb=1)
    res = merge_api.run_merge(opts)
    out = tmp_path / "d"
    names = {p.name for p in out.iterdir()}
    assert {"es_merging.json", "config.json", "model.safetensors", "coefficients.safetensors", "report.json",
            "README.md", "tokenizer.json"} <= names
    assert "layer_coefficients.png" not in names and "base" not in names  # not a layer method; a full checkpoint
    assert res.manifest["mode"] == "delta" and res.manifest["backbone"]["format"] == "dense"
    assert res.manifest["probe"] is None
    with safe_open(str(out / "coefficients.safetensors"), framework="pt") as h:
        assert list(h.keys()) == [] and h.metadata()["method"] == "ties"
    specs = [load_expert_spec(zoo["dense1"]), load_expert_spec(zoo["dense2"])]
    assert_bitwise(load_dir(out), reference_merge(zoo["base"], specs, get_method("ties", density=0.5)))


def test_es_without_probe_is_refused(zoo, tmp_path):
    opts = MergeOptions(base=zoo["base"], experts=[zoo["mol"], zoo["prot"]], method="es", out=tmp_path / "o")
    with pytest.raises(MergeError, match="--probe"):
        merge_api.run_merge(opts)
    assert list(tmp_path.iterdir()) == []


def test_expert_on_another_base_refused_before_writing(zoo, tmp_path):
    opts = MergeOptions(base=zoo["other_base"], experts=[zoo["mol"], zoo["prot"]], method="average", out=tmp_path / "o")
    with pytest.raises(ExpertError, match="'mol'.*trained on base"):
        merge_api.run_merge(opts)
    assert list(tmp_path.iterdir()) == []


def test_missing_adapter_file_refused(zoo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(zoo["prot"], broken)
    (broken / "adapter_model.safetensors").unlink()
    opts = MergeOptions(base=zoo["base"], experts=[zoo["mol"], broken], method="average", out=tmp_path / "o")
    with pytest.raises(ExpertError, match="broken.*missing adapter_model.safetensors"):
        merge_api.run_merge(opts)
    assert not (tmp_path / "o").exists()


def test_plain_hf_checkpoints_without_expert_json(zoo, tmp_path):
    for name in ("dense1", "dense2"):
        assert not (zoo[name] / "expert.json").exists()
    opts = MergeOptions(base=zoo["base"], experts=[zoo["dense1"], zoo["dense2"]], method="task_arithmetic",
                        params={"scaling": 0.5}, out=tmp_path / "ta")
    m = merge_api.run_merge(opts).manifest
    assert [e["modality"] for e in m["experts"]] == [None, None]


def test_no_bundle_references_base_by_path(zoo, tmp_path):
    opts = MergeOptions(base=zoo["base"], experts=[zoo["mol"], zoo["prot"]], method="average", out=tmp_path / "nb",
                        bundle_base=False)
    m = merge_api.run_merge(opts).manifest
    assert m["base"]["bundled"] is False and not (tmp_path / "nb" / "base").exists()
    assert m["options"]["bundle_base"] is False  # recorded with the other options
    assert Path(m["base"]["path"]) == zoo["base"].resolve()


def test_manifest_errors_name_the_file(zoo, tmp_path):
    with pytest.raises(ExpertError, match="es_merging.json is missing"):
        load_model(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ExpertError, match="garbled"):
        load_model(tmp_path)
    opts = MergeOptions(base=zoo["base"], experts=[zoo["mol"], zoo["prot"]], method="average", out=tmp_path / "m")
    merge_api.run_merge(opts)
    (tmp_path / "m" / "adapter_model.safetensors").unlink()
    with pytest.raises(ExpertError, match="adapter_model.safetensors is missing"):
        load_model(tmp_path / "m")


@needs_mllm
def test_load_model_lora_output_answers_a_forward_pass(zoo, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    opts = MergeOptions(base=zoo["base"], experts=[zoo["mol"], zoo["prot"], zoo["cell"]], method="ties",
                        out=tmp_path / "m")
    merge_api.run_merge(opts)
    model = load_model(tmp_path / "m")
    assert model.active_adapter == "merged" and "molecule" in model.encoders
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        got = model.backbone(input_ids=ids).logits
        base = LlamaForCausalLM.from_pretrained(str(zoo["base"]))
        plain = base(input_ids=ids).logits
        expected = PeftModel.from_pretrained(base, str(tmp_path / "m")).eval()(input_ids=ids).logits
    assert torch.isfinite(got).all() and not torch.allclose(got, plain)
    torch.testing.assert_close(got, expected)
    # a tampered base is refused
    bundled = tmp_path / "m" / "base" / "model.safetensors"
    t = load_file(str(bundled))
    t["lm_head.weight"] = t["lm_head.weight"] + 1
    save_file(t, str(bundled), metadata={"format": "pt"})
    with pytest.raises(ExpertError, match="hash"):
        load_model(tmp_path / "m")


@needs_mllm
def test_load_model_dense_output(zoo, tmp_path):
    opts = MergeOptions(base=zoo["base"], experts=[zoo["mol"], zoo["prot"]], method="average", mode="delta",
                        out=tmp_path / "dense")
    merge_api.run_merge(opts)
    model = load_model(tmp_path / "dense")
    assert model.adapter_names == []
    merged = load_dir(tmp_path / "dense")
    torch.testing.assert_close(model.backbone.model.layers[0].self_attn.q_proj.weight,
                               merged["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.slow
@needs_mllm
def test_es_merge_on_the_zoo_loads_and_answers(zoo_dir, zoo_probe, tmp_path, capsys):
    """`es-merging merge --method es` on the embedded zoo: load_model works and answers a forward pass."""
    from es_merging.cli import main

    out = tmp_path / "es"
    assert main(["merge", "--base", str(zoo_dir / "base"), "--experts", *(str(zoo_dir / m) for m in ("molecule", "protein", "cell")),
                 "--method", "es", "--probe", str(zoo_probe), "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "factor" and summary["timings"]["signals"] > 0
    m = read_manifest(out)
    assert set(m["encoders"]) == {"molecule", "protein"} and m["probe"]["hash"].startswith("sha256:")
    report = json.loads((out / "report.json").read_text())
    lam = torch.tensor([row["lambda"] for row in report["lambda"]])
    assert lam.shape == (3, json.loads((zoo_dir / "base" / "config.json").read_text())["num_hidden_layers"])
    torch.testing.assert_close(lam.sum(0), torch.ones(lam.shape[1]), atol=1e-5, rtol=0)  # softmax over experts
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "layer_coefficients.png")).shape[2] in (3, 4)
    model = load_model(out)
    assert model.active_adapter == "merged"
    ids = model.tokenizer("Molecule: lipophilic", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model.backbone(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_run_merge_cancelled_midway_leaves_nothing(zoo, tmp_path):
    import threading

    from es_merging.engine import MergeCancelled

    cancel = threading.Event()

    def progress(stage, done, total):
        if stage == "merge" and done == 3:
            cancel.set()

    opts = MergeOptions(base=zoo["base"], experts=[zoo["dense1"], zoo["dense2"]], method="average", out=tmp_path / "o")
    with pytest.raises(MergeCancelled):
        merge_api.run_merge(opts, progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_plain_peft_adapters_without_expert_json(zoo, tmp_path):
    from test_engine import make_lora

    a = make_lora(tmp_path / "a", zoo["base"], seed=1, expert_json=False)
    b = make_lora(tmp_path / "b", zoo["base"], seed=2, expert_json=False)
    opts = MergeOptions(base=zoo["base"], experts=[a, b], method="ties", out=tmp_path / "m")
    m = merge_api.run_merge(opts).manifest
    assert m["mode"] == "factor" and [e["name"] for e in m["experts"]] == ["a", "b"]
    assert [e["declared_base_hash"] for e in m["experts"]] == [None, None]
