"""ES signals for dense (full-checkpoint) experts, checked against the LoRA experts they were
materialised from: W_dense = W_base + scale * B A computes the same hidden states as the adapter,
so the layer signals must agree, and the gradient w.r.t. W_dense must equal the delta-mode score
(the gradient w.r.t. the adapted module's base weight with the adapter on)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from es_merging.errors import MergeError
from es_merging.experts import base_hash, load_expert_spec
from es_merging.methods import get_method
from es_merging.probe import Probe
from es_merging.signals import compute_signals, layer_of

EXPERTS = ("molecule", "protein", "cell")


def _materialise_dense(zoo_dir: Path, name: str, out: Path) -> Path:
    """The LoRA expert ``name`` merged into the base and saved as a dense expert directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = load_expert_spec(zoo_dir / name)
    base = AutoModelForCausalLM.from_pretrained(str(zoo_dir / "base"), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(lora.path)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    manifest = {"format": "es-merging-expert/1", "name": name, "modality": lora.modality, "kind": "dense",
                "base_hash": base_hash(zoo_dir / "base"), "encoder": None}
    if lora.encoder_dir is not None:
        shutil.copytree(lora.encoder_dir, out / "encoder")
        manifest["encoder"] = "encoder"
    (out / "expert.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def dense_dirs(zoo_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("dense_experts")
    return [_materialise_dense(zoo_dir, m, root / m) for m in EXPERTS]


@pytest.fixture(scope="module")
def probe(zoo_probe):
    p = Probe.load(zoo_probe)
    return p.model_copy(update={"samples": p.samples[:8]})


@pytest.fixture(scope="module")
def both_signals(zoo_dir, dense_dirs, probe):
    """ES signals (layer and element) of the LoRA experts in delta mode and of their dense twins."""
    method = get_method("es", num_projections=64)
    lora = compute_signals(zoo_dir / "base", [load_expert_spec(zoo_dir / m) for m in EXPERTS], probe,
                           mode="delta", method=method, seed=0, batch_size=4)
    dense = compute_signals(zoo_dir / "base", [load_expert_spec(d) for d in dense_dirs], probe,
                            mode="delta", method=method, seed=0, batch_size=4)
    return lora, dense


def _in_layer_keys(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(checkpoint), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys() if layer_of(k) is not None}


def test_dense_layer_signals_equal_lora(both_signals):
    lora, dense = both_signals
    assert dense.expert_names == list(EXPERTS) and dense.modalities == lora.modalities and dense.own == lora.own
    assert (dense.swd > 0).all()
    torch.testing.assert_close(dense.swd, lora.swd, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(dense.lam, lora.lam, rtol=1e-3, atol=1e-4)


def test_dense_element_scores_cover_every_layer_tensor(both_signals, dense_dirs):
    lora, dense = both_signals
    expected = _in_layer_keys(dense_dirs[0] / "model.safetensors")
    assert set(dense.scores) == set(expected)
    assert any(k.endswith("layernorm.weight") for k in expected)  # the norms are scored too
    for key, shape in expected.items():
        assert tuple(dense.scores[key].shape) == (3, *shape), key
        assert dense.scores[key].abs().sum() > 0, key
    # projections: LoRA delta-mode scores are gradients w.r.t. the same (merged) module weights
    assert set(lora.scores) < set(dense.scores) and len(lora.scores) == 14
    for key, s in lora.scores.items():
        torch.testing.assert_close(dense.scores[key], s, rtol=2e-3, atol=1e-7)


def test_run_merge_es_on_dense_experts(zoo_dir, dense_dirs, zoo_probe, probe, tmp_path):
    from es_merging import load_model
    from es_merging.merge_api import run_merge
    from es_merging.options import MergeOptions

    out = tmp_path / "merged"
    small_probe = tmp_path / "probe.json"
    probe.save(small_probe)
    opts = MergeOptions(base=zoo_dir / "base", experts=dense_dirs, method="es", mode="delta",
                        params={"num_projections": 64}, probe=small_probe, out=out, batch_size=4)
    result = run_merge(opts)
    assert [e["kind"] for e in result.manifest["experts"]] == ["dense"] * 3
    merged = load_file(str(out / "model.safetensors"))
    experts = [load_file(str(d / "model.safetensors")) for d in dense_dirs]
    # outside the layers: the uniform average (DESIGN); inside: ES weights, not the average
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(merged[key], sum(e[key] for e in experts) / 3, rtol=1e-5, atol=1e-6)
    key = "model.layers.0.self_attn.q_proj.weight"  # (the LoRA-made twins share the base's norms)
    assert not torch.allclose(merged[key], sum(e[key] for e in experts) / 3, rtol=1e-4, atol=1e-6)
    with safe_open(str(out / "coefficients.safetensors"), framework="pt") as fh:
        assert {"lam", f"element/{key}", "element/model.layers.1.post_attention_layernorm.weight"} <= set(fh.keys())
    model = load_model(out)
    batch = model.collate([model.renderer.render(s) for s in probe.samples[:4]])
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape[0] == 4 and torch.isfinite(logits).all()


def _broken_copy(src: Path, out: Path, edit) -> Path:
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("what", ["stray", "shape"])
def test_misfit_dense_checkpoint_is_refused_by_name(zoo_dir, dense_dirs, probe, tmp_path, what):
    if what == "stray":
        key = "model.layers.1.mlp.extra_proj.weight"
        broken = _broken_copy(dense_dirs[1], tmp_path / "protein", lambda t: t.__setitem__(key, torch.zeros(4, 4)))
    else:
        key = "model.layers.1.mlp.up_proj.weight"
        broken = _broken_copy(dense_dirs[1], tmp_path / "protein", lambda t: t.__setitem__(key, t[key][:-1].clone()))
    specs = [load_expert_spec(dense_dirs[0]), load_expert_spec(broken)]
    with pytest.raises(MergeError, match=f"'protein'.*{re.escape(key)}"):
        compute_signals(zoo_dir / "base", specs, probe, mode="delta", method=get_method("es_layer", num_projections=8))


def test_base_weights_are_restored_after_an_exception(zoo_dir, dense_dirs, probe):
    from es_merging.dense_swap import dense_expert_swapped_in
    from es_merging.mllm import MultimodalModel

    model = MultimodalModel.load(zoo_dir / "base", encoders={m: zoo_dir / m / "encoder" for m in ("molecule", "protein")})
    batch = model.collate([model.renderer.render(s) for s in probe.samples[:4]])
    with torch.no_grad():
        before = model(batch).logits
    spec = load_expert_spec(dense_dirs[0])
    with pytest.raises(RuntimeError, match="boom"):
        with dense_expert_swapped_in(model.backbone, spec) as swapped:
            assert len(swapped) == len(load_file(str(dense_dirs[0] / "model.safetensors")))
            with torch.no_grad():
                assert not torch.allclose(model(batch).logits, before)  # the expert really computes
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(model(batch).logits, before)
