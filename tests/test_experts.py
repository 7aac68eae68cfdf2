"""Expert specs, compatibility checks and the base content hash."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from es_merging.errors import ExpertError
from es_merging.experts import (
    EXPERT_FORMAT,
    base_hash,
    check_compatible,
    checkpoint_files,
    load_expert_spec,
)


def _copy(src: Path, dst: Path, names: list[str] | None = None) -> Path:
    if names is None:
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True)
        for n in names:
            shutil.copy2(src / n, dst / n)
    return dst


def _manifest(path: Path) -> dict:
    return json.loads((path / "expert.json").read_text())


def _write_manifest(path: Path, meta: dict) -> None:
    (path / "expert.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- recognising experts


def test_zoo_experts(zoo_dir):
    digest = base_hash(zoo_dir / "base")
    report = json.loads((zoo_dir / "zoo.json").read_text())
    for modality in ("molecule", "protein", "cell"):
        spec = load_expert_spec(zoo_dir / modality)
        assert spec.name == modality and spec.modality == modality
        assert spec.kind == "lora"
        assert spec.rank == report["preset"]["lora_rank"] == 4
        assert spec.lora_scaling == pytest.approx(report["preset"]["lora_alpha"] / 4)
        assert spec.base_hash == digest
        assert spec.weight_files() == [spec.path / "adapter_model.safetensors"]
        if modality == "cell":
            assert spec.encoder_dir is None
        else:
            assert spec.encoder_dir == (zoo_dir / modality / "encoder").resolve()
        d = spec.to_dict()
        assert d["modality"] == modality and d["rank"] == 4 and d["kind"] == "lora"
    specs = [load_expert_spec(zoo_dir / m) for m in ("molecule", "protein", "cell")]
    assert check_compatible(zoo_dir / "base", specs, require_modality=True) == digest


def test_plain_peft_adapter_without_manifest(zoo_dir, tmp_path):
    path = _copy(zoo_dir / "cell", tmp_path / "my-adapter", ["adapter_config.json", "adapter_model.safetensors"])
    spec = load_expert_spec(path)
    assert spec.kind == "lora" and spec.name == "my-adapter"
    assert spec.modality is None and spec.base_hash is None and spec.encoder_dir is None
    assert spec.rank == 4
    # accepted for plain merges, refused where ES needs a modality
    other = load_expert_spec(zoo_dir / "molecule")
    check_compatible(zoo_dir / "base", [spec, other])
    with pytest.raises(ExpertError, match="'my-adapter'.*declares no modality"):
        check_compatible(zoo_dir / "base", [spec, other], require_modality=True)


def test_dense_checkpoint_dir(zoo_dir, tmp_path):
    path = _copy(zoo_dir / "base", tmp_path / "dense")
    spec = load_expert_spec(path)
    assert spec.kind == "dense" and spec.rank is None and spec.modality is None
    assert [f.name for f in spec.weight_files()] == ["model.safetensors"]
    _write_manifest(path, {"format": EXPERT_FORMAT, "name": "dense-mol", "kind": "dense", "modality": "molecule",
                           "base_hash": base_hash(zoo_dir / "base")})
    spec = load_expert_spec(path)
    assert spec.kind == "dense" and spec.name == "dense-mol" and spec.modality == "molecule"
    # a dense expert without weights
    (path / "model.safetensors").unlink()
    with pytest.raises(ExpertError, match="no \\*.safetensors weights"):
        load_expert_spec(path)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def mol_expert(zoo_dir, tmp_path) -> Path:
    return _copy(zoo_dir / "molecule", tmp_path / "mol")


def test_manifest_errors(mol_expert):
    good = _manifest(mol_expert)
    (mol_expert / "expert.json").write_text("{not json")
    with pytest.raises(ExpertError, match="expert.json: invalid JSON"):
        load_expert_spec(mol_expert)
    for bad in ({**good, "format": "something/2"}, {k: v for k, v in good.items() if k != "format"}, [good]):
        _write_manifest(mol_expert, bad)
        with pytest.raises(ExpertError, match="expected \"format\""):
            load_expert_spec(mol_expert)
    _write_manifest(mol_expert, {**good, "kind": "qlora"})
    with pytest.raises(ExpertError, match="kind must be 'lora' or 'dense'"):
        load_expert_spec(mol_expert)
    for key, value in (("modality", 3), ("name", ""), ("base_hash", ["x"]), ("encoder", {"dir": "encoder"})):
        _write_manifest(mol_expert, {**good, key: value})
        with pytest.raises(ExpertError, match=f"'{key}' must be a non-empty string"):
            load_expert_spec(mol_expert)
    # optional fields may be absent: name falls back to the directory, modality unknown
    _write_manifest(mol_expert, {"format": EXPERT_FORMAT})
    spec = load_expert_spec(mol_expert)
    assert spec.name == "mol" and spec.modality is None and spec.kind == "lora" and spec.encoder_dir is None


def test_missing_adapter_files(mol_expert):
    weights = mol_expert / "adapter_model.safetensors"
    weights.rename(mol_expert / "adapter_model.bin")
    with pytest.raises(ExpertError, match="missing adapter_model.safetensors.*pickle"):
        load_expert_spec(mol_expert)
    (mol_expert / "adapter_model.bin").unlink()
    with pytest.raises(ExpertError, match="missing adapter_model.safetensors"):
        load_expert_spec(mol_expert)
    (mol_expert / "adapter_config.json").unlink()
    with pytest.raises(ExpertError, match="missing adapter_config.json"):
        load_expert_spec(mol_expert)


def test_adapter_config_errors(mol_expert):
    cfg_path = mol_expert / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ExpertError, match="peft_type 'IA3' is not LORA"):
        load_expert_spec(mol_expert)
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "r"}))
    with pytest.raises(ExpertError, match="no LoRA rank 'r'"):
        load_expert_spec(mol_expert)
    cfg_path.write_text("{")
    with pytest.raises(ExpertError, match="adapter_config.json: invalid JSON"):
        load_expert_spec(mol_expert)


def test_encoder_path_must_stay_inside(mol_expert, tmp_path):
    good = _manifest(mol_expert)
    outside = _copy(mol_expert / "encoder", tmp_path / "outside-encoder")
    for bad in ("../outside-encoder", str(outside), "encoder/../../outside-encoder"):
        _write_manifest(mol_expert, {**good, "encoder": bad})
        with pytest.raises(ExpertError, match="leaves the expert directory"):
            load_expert_spec(mol_expert)
    # a symlink pointing outside is resolved and refused too
    os.symlink(outside, mol_expert / "linked")
    _write_manifest(mol_expert, {**good, "encoder": "linked"})
    with pytest.raises(ExpertError, match="leaves the expert directory"):
        load_expert_spec(mol_expert)
    # inside but incomplete
    _write_manifest(mol_expert, good)
    (mol_expert / "encoder" / "model.safetensors").unlink()
    with pytest.raises(ExpertError, match="encoder file .*model.safetensors is missing"):
        load_expert_spec(mol_expert)
    _write_manifest(mol_expert, {**good, "encoder": "no-such-dir"})
    with pytest.raises(ExpertError, match="no-such-dir/config.json is missing"):
        load_expert_spec(mol_expert)


def test_not_a_directory(tmp_path):
    with pytest.raises(ExpertError, match="not a directory"):
        load_expert_spec(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertError, match="neither adapter_config.json nor config.json"):
        load_expert_spec(tmp_path / "empty")


def test_check_compatible_refuses_other_base(zoo_dir, tmp_path):
    mol = _copy(zoo_dir / "molecule", tmp_path / "mol")
    alien = _copy(zoo_dir / "protein", tmp_path / "alien")
    meta = _manifest(alien)
    _write_manifest(alien, {**meta, "name": "alien-protein", "base_hash": "sha256:" + "0" * 64})
    specs = [load_expert_spec(mol), load_expert_spec(alien)]
    with pytest.raises(ExpertError) as err:
        check_compatible(zoo_dir / "base", specs)
    msg = str(err.value)
    assert "'alien-protein'" in msg and str(alien.resolve()) in msg and "sha256:0000" in msg
    assert "'mol'" not in msg.split("base given")[0].replace("alien", "")


def test_check_compatible_counts_and_names(zoo_dir):
    mol = load_expert_spec(zoo_dir / "molecule")
    prot = load_expert_spec(zoo_dir / "protein")
    with pytest.raises(ExpertError, match="at least 2 experts, got 1"):
        check_compatible(zoo_dir / "base", [mol])
    with pytest.raises(ExpertError, match="at least 2 experts, got 0"):
        check_compatible(zoo_dir / "base", [])
    with pytest.raises(ExpertError, match=r"unique; repeated: \['molecule'\]"):
        check_compatible(zoo_dir / "base", [mol, prot, mol])


# ----------------------------------------------------------------------------- base hash


def test_base_hash_ignores_sharding_and_sees_every_weight(zoo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = base_hash(zoo_dir / "base")
    assert original.startswith("sha256:") and len(original) == 7 + 64
    model = AutoModelForCausalLM.from_pretrained(str(zoo_dir / "base"), dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="100KB", safe_serialization=True)
    shards = checkpoint_files(sharded)
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").exists()
    assert base_hash(sharded) == original
    # same tensors, another single-file layout and name order
    state = load_file(str(zoo_dir / "base" / "model.safetensors"))
    single = _copy(zoo_dir / "base", tmp_path / "single", ["config.json"])
    save_file(dict(reversed(list(state.items()))), str(single / "weights.safetensors"))
    assert base_hash(single) == original

    # other safetensors beside model.safetensors (a merged model's coefficients) are not weights
    merged = _copy(zoo_dir / "base", tmp_path / "merged-dense", ["config.json", "model.safetensors"])
    save_file({"lam": torch.ones(3, 2)}, str(merged / "coefficients.safetensors"))
    assert [f.name for f in checkpoint_files(merged)] == ["model.safetensors"]
    assert base_hash(merged) == original

    # one element of one weight changes -> another hash (same file size: the cache must not hide it)
    key = sorted(state)[len(state) // 2]
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1.0
    save_file(state, str(single / "weights.safetensors"))
    assert base_hash(single) != original
    # a renamed tensor changes it too
    state = load_file(str(zoo_dir / "base" / "model.safetensors"))
    state["renamed." + key] = state.pop(key)
    save_file(state, str(single / "weights.safetensors"))
    assert base_hash(single) != original


def test_checkpoint_files_refuses_pickles_and_missing_shards(zoo_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ExpertError, match="only pickle weights \\(pytorch_model.bin\\).*safetensors only"):
        checkpoint_files(pickled)
    with pytest.raises(ExpertError, match="only pickle weights"):
        load_expert_spec(pickled)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(ExpertError, match="missing: .*model-00001.safetensors"):
        checkpoint_files(broken)
    (broken / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ExpertError, match="unreadable shard index"):
        checkpoint_files(broken)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ExpertError, match="not a readable safetensors file"):
        base_hash(garbage)
