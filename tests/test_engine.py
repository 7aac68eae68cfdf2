"""Streaming merge engine: exactness against the in-memory reference, modes, errors, atomicity.

Also home of the tiny synthetic checkpoints (a real LlamaForCausalLM saved by transformers, real
PEFT LoRA adapters saved by peft) that the other merge tests import."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from es_merging.engine import (
    MergeCancelled,
    ShardWriter,
    OutSpec,
    atomic_output,
    execute_plan,
    layer_index,
    merge,
    plan_merge,
    reference_merge,
    tensor_seed,
)
from es_merging.errors import ExpertError, MergeError
from es_merging.experts import EXPERT_FORMAT, base_hash, load_expert_spec
from es_merging.methods.base import MergeMethod, TensorContext, get_method
from es_merging.signals_types import Signals

TARGETS = ["q_proj", "v_proj", "down_proj"]
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ synthetic checkpoints
def make_base(path: Path, *, layers: int = 2, hidden: int = 16, seed: int = 0, tokenizer: bool = False) -> Path:
    """A tiny LlamaForCausalLM (vocab 300: room for a byte-level tokenizer) saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer:
        from es_merging.zoo.tokenizer import save_tokenizer, train_tokenizer

        save_tokenizer(train_tokenizer(["Molecule: lipophilic\nProtein: kinase\nCell: T cell, CD3D"] * 4, vocab_size=300), path)
    return path


def write_expert_json(path: Path, name: str, modality: str | None, base_dir: Path | None, kind: str,
                      digest: str | None = None) -> None:
    meta = {"format": EXPERT_FORMAT, "name": name, "kind": kind, "modality": modality,
            "base_hash": digest if digest is not None else (base_hash(base_dir) if base_dir else None)}
    (path / "expert.json").write_text(json.dumps(meta))


def make_lora(path: Path, base_dir: Path, *, seed: int, r: int = 4, alpha: int = 8, name: str | None = None,
              modality: str | None = "molecule", targets=TARGETS, expert_json: bool = True,
              encoder: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False, lora_dropout=0.0))
    peft_model.save_pretrained(str(path), safe_serialization=True)
    if encoder:  # a molecule encoder (fingerprint MLP -> 8 soft tokens), as the zoo's experts carry
        from es_merging.encoders import FingerprintEncoder

        FingerprintEncoder(model.config.hidden_size, n_tokens=8, n_bits=64, width=16).save(path / "encoder")
    if expert_json:
        write_expert_json(path, name or path.name, modality, base_dir, "lora")
        if encoder:
            meta = json.loads((path / "expert.json").read_text())
            (path / "expert.json").write_text(json.dumps({**meta, "encoder": "encoder"}))
    return path


def make_dense(path: Path, base_dir: Path, *, seed: int, noise: float = 0.02) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    base = make_base(root / "base", tokenizer=True)
    other = make_base(root / "other_base", seed=7)
    out = {"root": root, "base": base, "other_base": other}
    for i, (name, mod) in enumerate([("mol", "molecule"), ("prot", "protein"), ("cell", "cell")]):
        out[name] = make_lora(root / name, base, seed=10 + i, alpha=4 * (i + 1), name=name, modality=mod,
                              encoder=(mod == "molecule"))
    out["rank8"] = make_lora(root / "rank8", base, seed=20, r=8, alpha=8, name="rank8")
    out["dense1"] = make_dense(root / "dense1", base, seed=1)
    out["dense2"] = make_dense(root / "dense2", base, seed=2)
    out["dense3"] = make_dense(root / "dense3", base, seed=3)
    return out


def specs(*paths: Path):
    return [load_expert_spec(p) for p in paths]


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "coefficients.safetensors":
            out.update(load_file(str(f)))
    return out


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def synthetic_signals(plan, seed: int = 0) -> Signals:
    g = torch.Generator().manual_seed(seed)
    n_exp, n_layers = len(plan.expert_names), plan.num_layers
    swd = torch.rand(n_exp, n_layers, 3, generator=g)
    lam = torch.softmax(torch.randn(n_exp, n_layers, generator=g), dim=0)
    scores = {t.key: torch.rand(n_exp, *t.shape, generator=g) for t in plan.tasks if t.layer is not None}
    return Signals(expert_names=list(plan.expert_names), modalities=["molecule", "protein", "cell"],
                   own=[0, 1, 2][:n_exp], swd=swd, delta_swd=swd, lam=lam, scores=scores, meta={"synthetic": True})


class Boom(MergeMethod):
    """Averages, but fails on the n-th tensor (an exception injected mid-merge)."""

    name = "boom"
    summary = "test only"

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def merge_tensor(self, deltas: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return deltas.mean(0)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("method,params", [("average", {}), ("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}),
                                           ("task_arithmetic", {"scaling": 0.7})])
def test_factor_stream_equals_reference(zoo, tmp_path, method, params):
    experts = specs(zoo["mol"], zoo["prot"], zoo["cell"])
    m = get_method(method, **params)
    res = merge(zoo["base"], experts, m, tmp_path / "out", seed=3)
    ref = reference_merge(zoo["base"], experts, m, seed=3)
    assert_bitwise(load_dir(tmp_path / "out"), ref)
    assert res.files == ["adapter_model.safetensors"]
    assert len(ref) == 2 * len(TARGETS) * 2  # A and B of each target module in 2 layers


@pytest.mark.parametrize("method", ["es", "es_layer", "es_element"])
def test_es_family_stream_equals_reference_both_modes(zoo, tmp_path, method):
    experts = specs(zoo["mol"], zoo["prot"], zoo["cell"])
    m = get_method(method)
    for mode in ("factor", "delta"):
        sig = synthetic_signals(plan_merge(zoo["base"], experts, mode=mode), seed=5)
        merge(zoo["base"], experts, m, tmp_path / mode, mode=mode, seed=1, signals=sig, shard_size_mb=0.003)
        assert_bitwise(load_dir(tmp_path / mode), reference_merge(zoo["base"], experts, m, mode=mode, seed=1, signals=sig))
    assert (tmp_path / "delta" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("method", ["average", "ties", "dare_linear"])
def test_delta_dense_output_several_shards(zoo, tmp_path, method):
    experts = specs(zoo["mol"], zoo["prot"], zoo["cell"])
    m = get_method(method)
    res = merge(zoo["base"], experts, m, tmp_path / "out", mode="delta", seed=9, shard_size_mb=0.003)
    got = load_dir(tmp_path / "out")
    assert_bitwise(got, reference_merge(zoo["base"], experts, m, mode="delta", seed=9))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and shards == {f for f in res.files if f.endswith(".safetensors")}
    base = load_file(str(zoo["base"] / "model.safetensors"))
    assert sorted(got) == sorted(base)  # a full checkpoint
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not adapted: copied
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert (tmp_path / "out" / "config.json").exists()


def test_delta_mode_matches_peft_merge_and_average(zoo, tmp_path):
    """Average in delta mode == base + mean_e (scale_e B_e A_e), computed here from the adapter files."""
    experts = specs(zoo["mol"], zoo["prot"])
    merge(zoo["base"], experts, get_method("average"), tmp_path / "out", mode="delta")
    got = load_dir(tmp_path / "out")
    base = load_file(str(zoo["base"] / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    dws = []
    for e in experts:
        ad = load_file(str(e.path / "adapter_model.safetensors"))
        a = ad["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
        b = ad["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
        dws.append(e.lora_scaling * (b @ a))
    torch.testing.assert_close(got[key], base[key] + (dws[0] + dws[1]) / 2, rtol=1e-5, atol=1e-6)


def test_delta_svd_rank(zoo, tmp_path):
    experts = specs(zoo["mol"], zoo["prot"], zoo["cell"])
    m = get_method("average")
    merge(zoo["base"], experts, m, tmp_path / "r2", mode="delta", rank=2)
    got = load_dir(tmp_path / "r2")
    assert_bitwise(got, reference_merge(zoo["base"], experts, m, mode="delta", rank=2))
    cfg = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2
    dense = reference_merge(zoo["base"], experts, m, mode="delta")
    base = load_file(str(zoo["base"] / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    dw = dense[key] - base[key]
    a = got["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = got["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (2, 16) and b.shape == (16, 2)
    s = torch.linalg.svdvals(dw)
    # Eckart-Young: the rank-2 error is exactly the discarded singular values
    torch.testing.assert_close(torch.linalg.matrix_norm(dw - b @ a), s[2:].norm(), rtol=1e-4, atol=1e-6)
    with pytest.raises(MergeError, match="exceeds"):
        plan_merge(zoo["base"], experts, mode="delta", rank=17)


def test_factor_folds_scaling_and_sets_alpha_to_rank(zoo, tmp_path):
    experts = specs(zoo["mol"], zoo["prot"])  # alphas 4 and 8 at r=4: scalings 1 and 2
    assert [e.lora_scaling for e in experts] == [1.0, 2.0]
    merge(zoo["base"], experts, get_method("average"), tmp_path / "out")
    got = load_dir(tmp_path / "out")
    ads = [load_file(str(e.path / "adapter_model.safetensors")) for e in experts]
    kb = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    ka = kb.replace("lora_B", "lora_A")
    torch.testing.assert_close(got[kb], (1.0 * ads[0][kb] + 2.0 * ads[1][kb]) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(got[ka], (ads[0][ka] + ads[1][ka]) / 2, rtol=0, atol=1e-7)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 4 and cfg["use_rslora"] is False


def test_factor_refuses_unequal_ranks_delta_accepts(zoo, tmp_path):
    experts = specs(zoo["mol"], zoo["rank8"])
    with pytest.raises(MergeError, match="rank8.*rank 8.*--mode delta"):
        plan_merge(zoo["base"], experts, mode="factor")
    m = get_method("average")
    merge(zoo["base"], experts, m, tmp_path / "d", mode="delta")
    assert_bitwise(load_dir(tmp_path / "d"), reference_merge(zoo["base"], experts, m, mode="delta"))


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.2}), ("dare_ties", {"density": 0.6}), ("average", {})])
def test_dense_experts_several_shards(zoo, tmp_path, method, params):
    experts = specs(zoo["dense1"], zoo["dense2"], zoo["dense3"])
    assert all(e.kind == "dense" for e in experts)
    m = get_method(method, **params)
    res = merge(zoo["base"], experts, m, tmp_path / "out", seed=4, shard_size_mb=0.004)
    assert_bitwise(load_dir(tmp_path / "out"), reference_merge(zoo["base"], experts, m, seed=4))
    assert len([f for f in res.files if f.startswith("model-")]) >= 3
    assert len(res.expert_hashes) == 3 and len(set(res.expert_hashes)) == 3
    plan = plan_merge(zoo["base"], experts)
    base_bytes = sum(torch.Size(t.base.shape).numel() * 4 for t in plan.tasks)
    assert res.bytes_read == plan.bytes_to_read + base_bytes  # the base is read twice: W_e - base, then base + merged
    with pytest.raises(MergeError, match="delta mode"):
        plan_merge(zoo["base"], experts, mode="factor")


def test_results_do_not_depend_on_order(zoo):
    assert tensor_seed(0, "a") == tensor_seed(0, "a") != tensor_seed(1, "a") != tensor_seed(0, "b")
    experts = specs(zoo["dense1"], zoo["dense2"])
    plan = plan_merge(zoo["base"], experts)
    keys = [t.key for t in plan.tasks]
    assert keys.index("model.layers.1.mlp.up_proj.weight") > keys.index("model.layers.0.mlp.up_proj.weight")
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12 and layer_index("lm_head.weight") is None


# ------------------------------------------------------------------ errors
def _copy_adapter(src: Path, dst: Path, drop: str | None = None, add: dict | None = None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    if drop:
        tensors.pop(drop)
    tensors.update(add or {})
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_missing_tensor_in_one_expert(zoo, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    broken = _copy_adapter(zoo["prot"], tmp_path / "broken", drop=key)
    with pytest.raises(MergeError, match="broken.*only one of its LoRA"):
        plan_merge(zoo["base"], specs(zoo["mol"], broken))
    both = key.rsplit(".lora_A", 1)[0]
    broken2 = tmp_path / "broken2"
    _copy_adapter(zoo["prot"], broken2)
    t = load_file(str(broken2 / "adapter_model.safetensors"))
    t = {k: v for k, v in t.items() if not k.startswith(both + ".")}
    save_file(t, str(broken2 / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match=r"broken2.*lacks LoRA module.*layers\.1\.self_attn\.q_proj"):
        plan_merge(zoo["base"], specs(zoo["mol"], broken2))


def test_shape_mismatch_and_unknown_tensor(zoo, tmp_path):
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    odd = _copy_adapter(zoo["prot"], tmp_path / "odd", add={key: torch.zeros(32, 4)})
    with pytest.raises(MergeError, match="odd.*down_proj.lora_B.*shape"):
        plan_merge(zoo["base"], specs(zoo["mol"], odd))
    extra = _copy_adapter(zoo["prot"], tmp_path / "extra", add={"base_model.model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(MergeError, match="extra.*lm_head.weight.*not a LoRA"):
        plan_merge(zoo["base"], specs(zoo["mol"], extra))


def test_dense_expert_with_tensor_the_base_lacks(zoo, tmp_path):
    import shutil

    d = tmp_path / "dense_extra"
    shutil.copytree(zoo["dense1"], d)
    t = load_file(str(d / "model.safetensors"))
    t["model.extra.weight"] = torch.zeros(3)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(MergeError, match="dense_extra.*model.extra.weight.*base lacks"):
        plan_merge(zoo["base"], specs(d, zoo["dense2"]))
    with pytest.raises(MergeError, match="dense.*LoRA|LoRA.*dense"):
        plan_merge(zoo["base"], specs(zoo["mol"], zoo["dense2"]))


def test_lora_on_a_base_lacking_the_module(zoo, tmp_path):
    import shutil

    small = tmp_path / "small_base"
    shutil.copytree(zoo["base"], small)
    t = load_file(str(small / "model.safetensors"))
    t.pop("model.layers.1.mlp.down_proj.weight")
    save_file(t, str(small / "model.safetensors"))
    with pytest.raises(MergeError, match="layers.1.mlp.down_proj.weight.*base lacks"):
        plan_merge(small, specs(zoo["mol"], zoo["prot"]), mode="delta")


def test_output_exists_refused_unless_overwrite(zoo, tmp_path):
    experts = specs(zoo["mol"], zoo["prot"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(MergeError, match="already exists.*--overwrite"):
        merge(zoo["base"], experts, get_method("average"), out)
    assert (out / "old.txt").exists()
    merge(zoo["base"], experts, get_method("average"), out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left
    with pytest.raises(MergeError, match="would replace the input"):
        merge(zoo["base"], experts, get_method("average"), zoo["mol"], overwrite=True)


def test_cancel_midway_leaves_nothing(zoo, tmp_path):
    experts = specs(zoo["dense1"], zoo["dense2"])
    cancel = threading.Event()
    seen = []

    def progress(stage, done, total):
        seen.append((stage, done, total))
        if stage == "merge" and done == 5:
            cancel.set()

    with pytest.raises(MergeCancelled, match="after 5 of"):
        merge(zoo["base"], experts, get_method("average"), tmp_path / "out", progress=progress, cancel=cancel,
              shard_size_mb=0.003)
    assert list(tmp_path.iterdir()) == []
    assert ("plan", 1, 1) in seen and seen[-1][:2] == ("merge", 5)


def test_exception_in_method_leaves_nothing(zoo, tmp_path):
    experts = specs(zoo["dense1"], zoo["dense2"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="injected"):
        merge(zoo["base"], experts, Boom(fail_at=7), tmp_path / "out", overwrite=True, shard_size_mb=0.003)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]  # replaced only at the very end


def test_atomic_output_removes_temp_on_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "x") as tmp:
            (tmp / "partial").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_es_needs_signals_and_matching_layers(zoo, tmp_path):
    experts = specs(zoo["mol"], zoo["prot"], zoo["cell"])
    with pytest.raises(MergeError, match="needs signals"):
        merge(zoo["base"], experts, get_method("es"), tmp_path / "o1")
    plan = plan_merge(zoo["base"], experts)
    sig = synthetic_signals(plan)
    sig.lam = sig.lam[:, :1]
    with pytest.raises(MergeError, match="layer 1.*shape"):
        merge(zoo["base"], experts, get_method("es_layer"), tmp_path / "o2", signals=sig)
    sig = synthetic_signals(plan)
    sig.scores.pop(plan.tasks[0].key)
    with pytest.raises(MergeError, match="no element scores"):
        merge(zoo["base"], experts, get_method("es_element"), tmp_path / "o3", signals=sig)
    assert list(tmp_path.iterdir()) == []


def test_element_coefficients_streamed(zoo, tmp_path):
    experts = specs(zoo["mol"], zoo["prot"], zoo["cell"])
    plan = plan_merge(zoo["base"], experts)
    sig = synthetic_signals(plan)
    tmp_path.joinpath("o").mkdir()
    res = execute_plan(plan, get_method("es"), tmp_path / "o", signals=sig, coefficients_file=tmp_path / "o" / "c.safetensors")
    coef = load_file(str(tmp_path / "o" / "c.safetensors"))
    assert torch.equal(coef["lam"], sig.lam)
    key = plan.tasks[0].key
    w = coef[f"element/{key}"]
    assert w.shape == (3, *plan.tasks[0].shape)
    torch.testing.assert_close(w.sum(0), torch.ones(w.shape[1:]))  # softmax over experts
    assert res.coefficients == {"lam": True, "element": True}


def test_shard_writer_files_are_standard_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.float32), "c": torch.randn(2).to(torch.bfloat16)}
    specs_ = [OutSpec(k, tuple(v.shape), {torch.float32: "F32", torch.bfloat16: "BF16"}[v.dtype]) for k, v in tensors.items()]
    w = ShardWriter(tmp_path, specs_, max_shard_bytes=64, single_name="model.safetensors")
    for k, v in tensors.items():
        w.write(k, v)
    files = w.finish()
    assert files[-1] == "model.safetensors.index.json" and len(files) == 3
    got = {}
    for f in files[:-1]:
        with safe_open(str(tmp_path / f), framework="pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert_bitwise(got, tensors)
    with pytest.raises(MergeError):
        ShardWriter(tmp_path, specs_, max_shard_bytes=None, single_name="x.safetensors").write("a", tensors["a"])


def test_expert_on_another_base_refused(zoo, tmp_path):
    from es_merging.experts import check_compatible

    experts = specs(zoo["mol"], zoo["prot"])
    with pytest.raises(ExpertError, match="mol.*trained on base"):
        check_compatible(zoo["other_base"], experts)


def test_bf16_checkpoints_merge_in_float32(zoo, tmp_path):
    import shutil

    dirs = []
    for name in ("base", "dense1", "dense2"):
        d = tmp_path / f"{name}_bf16"
        shutil.copytree(zoo[name], d, ignore=shutil.ignore_patterns("*.safetensors"))
        t = {k: v.to(torch.bfloat16) for k, v in load_file(str(zoo[name] / "model.safetensors")).items()}
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    experts = specs(dirs[1], dirs[2])
    m = get_method("ties", density=0.3)
    merge(dirs[0], experts, m, tmp_path / "out", shard_size_mb=0.003)
    got = load_dir(tmp_path / "out")
    assert_bitwise(got, reference_merge(dirs[0], experts, m))
    assert all(v.dtype == torch.bfloat16 for v in got.values())
