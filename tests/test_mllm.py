"""The multimodal model: adapter switching, soft tokens, encoder cache, hidden states, loading errors."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from es_merging.encoders import load_encoder
from es_merging.errors import ExpertError
from es_merging.mllm import MultimodalModel
from es_merging.probe import PLACEHOLDERS, Probe, ProbeSample

EXPERTS = ("molecule", "protein", "cell")


@pytest.fixture(scope="module")
def model(zoo_model) -> MultimodalModel:
    return zoo_model


@pytest.fixture(scope="module")
def samples(zoo_probe) -> list[ProbeSample]:
    return Probe.load(zoo_probe).samples[:4]


@pytest.fixture
def batch(model, samples):
    model.set_adapter(None)
    return model.collate([model.renderer.render(s) for s in samples])


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.forward(batch).logits


def _real(batch) -> torch.Tensor:
    return batch.attention_mask.bool()


# ----------------------------------------------------------------------------- adapters


def test_adapter_switching(model, batch):
    assert model.adapter_names == list(EXPERTS)
    model.set_adapter(None)
    assert model.active_adapter is None
    base = _logits(model, batch)
    real = _real(batch)
    outs = {}
    for name in EXPERTS:
        model.set_adapter(name)
        assert model.active_adapter == name
        outs[name] = _logits(model, batch)
        assert (outs[name] - base)[real].abs().max() > 1e-3, f"expert {name} gives the base's output"
    for a in EXPERTS:
        for b in EXPERTS:
            if a < b:
                assert (outs[a] - outs[b])[real].abs().max() > 1e-3
    model.set_adapter(None)
    assert torch.equal(_logits(model, batch), base)
    # switching between experts is exact too
    model.set_adapter("protein")
    assert torch.equal(_logits(model, batch), outs["protein"])
    model.set_adapter(None)


def test_base_is_the_plain_backbone(model, zoo_dir, batch):
    plain = MultimodalModel.load(zoo_dir / "base",
                                 encoders={m: zoo_dir / m / "encoder" for m in ("molecule", "protein")})
    assert plain.adapter_names == [] and plain.active_adapter is None
    plain.set_adapter(None)  # a no-op without adapters
    model.set_adapter(None)
    assert torch.allclose(_logits(plain, batch), _logits(model, batch), atol=1e-6, rtol=0)
    with pytest.raises(ExpertError, match="no adapter named 'molecule'"):
        plain.set_adapter("molecule")


def test_unknown_adapter(model):
    with pytest.raises(ExpertError, match=r"no adapter named 'mol'; attached: \['molecule', 'protein', 'cell'\]"):
        model.set_adapter("mol")


def test_load_activates_the_first_adapter(zoo_dir):
    m = MultimodalModel.load(zoo_dir / "base", adapters={"cell": zoo_dir / "cell"})
    assert m.active_adapter == "cell" and m.adapter_names == ["cell"]
    assert not m.training


# ----------------------------------------------------------------------------- soft tokens


def test_soft_tokens_replace_placeholders(model, samples):
    model.set_adapter(None)
    model.clear_cache()
    r = model.renderer.render(samples[0])
    batch = model.collate([r])
    with torch.no_grad():
        embeds = model.inputs_embeds(batch)[0]
        plain = model.backbone.get_input_embeddings()(batch.input_ids)[0]
        mol = model.encoders["molecule"]([samples[0].smiles])[0]
        prot = model.encoders["protein"]([samples[0].protein])[0]
    mol_mask = batch.masks["molecule"][0]
    prot_mask = batch.masks["protein"][0]
    assert mol.shape == (8, model.config.hidden_size)
    assert prot.shape == (len(samples[0].protein) + 2, model.config.hidden_size)
    assert torch.equal(embeds[mol_mask], mol)
    assert torch.equal(embeds[prot_mask], prot)
    other = ~(mol_mask | prot_mask)
    assert torch.equal(embeds[other], plain[other])
    # the placeholder embedding itself never reaches the model
    pid = model.placeholder_ids["molecule"]
    assert not torch.equal(embeds[mol_mask][0], model.backbone.get_input_embeddings().weight[pid])


def test_changing_the_smiles_changes_only_the_molecule_span_onwards(model, samples):
    model.set_adapter("molecule")
    a = samples[0]
    b = a.model_copy(update={"smiles": samples[1].smiles})
    assert a.smiles != b.smiles
    ra, rb = model.renderer.render(a), model.renderer.render(b)
    assert ra.input_ids == rb.input_ids  # same token ids: only the soft tokens differ
    with torch.no_grad():
        ha = model.hidden_states(model.collate([ra]))
        hb = model.hidden_states(model.collate([rb]))
    start = ra.masks["molecule"].index(True)
    end = start + 8
    for layer in range(len(ha)):
        assert torch.equal(ha[layer][0, :start], hb[layer][0, :start]), f"layer {layer}: prompt before the span changed"
        assert (ha[layer][0, start:end] - hb[layer][0, start:end]).abs().max() > 1e-4
    # and the change propagates to later tokens (after layer 1)
    assert (ha[-1][0, end:] - hb[-1][0, end:]).abs().max() > 1e-4
    model.set_adapter(None)


def test_missing_encoder_for_raw_input(zoo_dir, samples):
    m = MultimodalModel.load(zoo_dir / "base", encoders={"protein": zoo_dir / "protein" / "encoder"})
    from es_merging.probe import PromptRenderer

    r = PromptRenderer(m.tokenizer, {"molecule": lambda raw: 8, "protein": lambda raw: len(raw) + 2}).render(samples[0])
    with pytest.raises(ExpertError, match="raw molecule input but no molecule encoder"):
        m.forward(m.collate([r]))


def test_placeholder_count_mismatch(model, samples):
    r = model.renderer.render(samples[0])
    pid = model.placeholder_ids["protein"]
    r.input_ids = [i for k, i in enumerate(r.input_ids) if not (i == pid and k == r.input_ids.index(pid))]
    r.masks = {m: mask[:len(r.input_ids)] for m, mask in r.masks.items()}
    with pytest.raises(ExpertError, match="tokens but .* soft tokens"), torch.no_grad():
        model.forward(model.collate([r]))


def test_encoder_cache_at_inference_only(model, samples):
    enc = model.encoders["molecule"]
    calls: list[int] = []
    handle = enc.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    try:
        model.set_adapter(None)
        model.clear_cache()
        batch = model.collate([model.renderer.render(s) for s in samples])
        distinct = len({s.smiles for s in samples})
        with torch.no_grad():
            first = model.inputs_embeds(batch)
            second = model.inputs_embeds(batch)
        assert calls == [distinct]  # the second pass is served from the cache
        assert torch.equal(first, second)

        # gradients on (e.g. element-wise scores): no cache, fresh encoder outputs each time
        calls.clear()
        model.inputs_embeds(batch)
        model.inputs_embeds(batch)
        assert calls == [distinct, distinct]

        # training: the cache is cleared and never used, even under no_grad
        calls.clear()
        model.train()
        try:
            with torch.no_grad():
                model.inputs_embeds(batch)
                model.inputs_embeds(batch)
            assert calls == [distinct, distinct]
            assert model._soft_cache == {}
        finally:
            model.eval()
        calls.clear()
        with torch.no_grad():
            model.inputs_embeds(batch)
        assert calls == [distinct]  # after training the cache starts empty
    finally:
        handle.remove()
        model.clear_cache()


def test_encoder_cache_is_not_served_to_a_replaced_encoder(model, samples, zoo_dir):
    """The cache is keyed by input; an entry made by another encoder must not be a hit."""
    original = model.encoders["molecule"]
    other = load_encoder(zoo_dir / "molecule" / "encoder")
    with torch.no_grad():
        for param in other.projector().parameters():  # a different encoder: every soft token negated
            param.mul_(-1.0)
    model.set_adapter(None)
    model.clear_cache()
    batch = model.collate([model.renderer.render(s) for s in samples])
    rows = batch.masks["molecule"]
    try:
        with torch.no_grad():
            first = model.inputs_embeds(batch)
            model.encoders["molecule"] = other
            swapped = model.inputs_embeds(batch)
        assert torch.allclose(swapped[rows], -first[rows], atol=1e-6)  # the new encoder's tokens, not the cached
    finally:
        model.encoders["molecule"] = original
        model.clear_cache()


def test_soft_tokens_carry_gradients_to_the_encoder(model, samples):
    enc = model.encoders["molecule"]
    model.set_adapter(None)
    batch = model.collate([model.renderer.render(samples[0])])
    enc.zero_grad(set_to_none=True)
    out = model.forward(batch).logits
    out[0, -1].sum().backward()
    grads = [p.grad for p in enc.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    enc.zero_grad(set_to_none=True)
    model.backbone.zero_grad(set_to_none=True)


def test_hidden_states(model, batch):
    model.set_adapter("cell")
    with torch.no_grad():
        hs = model.hidden_states(batch)
        embeds = model.inputs_embeds(batch)
    assert len(hs) == model.num_layers + 1 == model.config.num_hidden_layers + 1
    for h in hs:
        assert h.shape == (*batch.input_ids.shape, model.config.hidden_size)
    assert torch.equal(hs[0], embeds)
    for a, b in zip(hs[:-1], hs[1:]):
        assert not torch.equal(a, b)
    model.set_adapter(None)


def test_collate_right_pads_and_aligns_masks(model, samples):
    short = samples[0].model_copy(update={"protein": "MKV"})
    rs = [model.renderer.render(s) for s in (samples[1], short)]
    b = model.collate(rs)
    assert len(b) == 2
    n0, n1 = len(rs[0].input_ids), len(rs[1].input_ids)
    assert b.input_ids.shape[1] == max(n0, n1)
    for row, r in enumerate(rs):
        n = len(r.input_ids)
        assert b.input_ids[row, :n].tolist() == r.input_ids
        assert b.attention_mask[row].tolist() == [1] * n + [0] * (b.input_ids.shape[1] - n)
        assert (b.input_ids[row, n:] == model.tokenizer.pad_token_id).all()
        for m in r.masks:
            assert b.masks[m][row, :n].tolist() == r.masks[m]
            assert not b.masks[m][row, n:].any()
    assert b.soft_inputs[1]["protein"] == "MKV"


# ----------------------------------------------------------------------------- loading errors


def _tiny_alien_lora(out: Path, hidden: int = 32) -> Path:
    """A LoRA adapter for another tiny Llama (different hidden size, same module names)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_adapter_of_another_shape_is_refused(zoo_dir, tmp_path, samples):
    alien = _tiny_alien_lora(tmp_path / "alien")
    # first adapter on a bare backbone
    m = MultimodalModel.load(zoo_dir / "base")
    with pytest.raises(ExpertError, match=r"adapter 'alien' at .*alien does not fit this backbone"):
        m.add_adapter("alien", alien)
    assert m.adapter_names == [] and m.active_adapter is None
    # after another adapter: the failed one is not left attached
    m = MultimodalModel.load(zoo_dir / "base", adapters={"cell": zoo_dir / "cell"})
    with pytest.raises(ExpertError, match="does not fit this backbone"):
        m.add_adapter("alien", alien)
    assert m.adapter_names == ["cell"]
    with pytest.raises(ExpertError, match="no adapter named 'alien'"):
        m.set_adapter("alien")
    m.set_adapter("cell")
    assert m.active_adapter == "cell"
    with pytest.raises(ExpertError, match="does not fit this backbone"):
        MultimodalModel.load(zoo_dir / "base", adapters={"cell": zoo_dir / "cell", "alien": alien})


def test_missing_adapter_weights(zoo_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(zoo_dir / "cell" / "adapter_config.json", d)
    with pytest.raises(ExpertError, match=r"adapter 'cell': .*noweights/adapter_model.safetensors is missing"):
        MultimodalModel.load(zoo_dir / "base", adapters={"cell": d})


def test_encoder_loading_errors(zoo_dir, tmp_path):
    src = zoo_dir / "molecule" / "encoder"
    with pytest.raises(ExpertError, match="config.json is missing"):
        load_encoder(tmp_path / "none")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(src / "config.json", no_weights)
    with pytest.raises(ExpertError, match="model.safetensors is missing"):
        MultimodalModel.load(zoo_dir / "base", encoders={"molecule": no_weights})
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["type"] == "fingerprint" and cfg["modality"] == "molecule"
    for name, bad, pattern in (
        ("unknown", {**cfg, "type": "graphformer"}, r"unknown type 'graphformer'; known: \['esm', 'fingerprint'\]"),
        ("notype", {k: v for k, v in cfg.items() if k != "type"}, "unknown type None"),
        ("badparam", {**cfg, "depth": 3}, "bad parameters"),
        ("mismatch", {**cfg, "width": cfg["width"] * 2}, "weights do not match its config"),
    ):
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ExpertError, match=pattern):
            load_encoder(d)
    d = tmp_path / "garbled"
    shutil.copytree(src, d)
    (d / "config.json").write_text("{")
    with pytest.raises(ExpertError, match="invalid JSON"):
        load_encoder(d)
    (d / "config.json").write_text("[1]")
    with pytest.raises(ExpertError, match="expected a JSON object"):
        load_encoder(d)
    d = tmp_path / "badweights"
    shutil.copytree(src, d)
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ExpertError, match="not a readable safetensors file"):
        load_encoder(d)
    enc = load_encoder(src)
    assert enc.num_tokens("CCO") == 8


def test_backbone_without_config(zoo_dir, tmp_path):
    d = tmp_path / "noconfig"
    shutil.copytree(zoo_dir / "base", d)
    (d / "config.json").unlink()
    with pytest.raises(ExpertError, match="config.json is missing"):
        MultimodalModel.load(d)


def test_backbone_tokenizer_errors(zoo_dir, tmp_path):
    from es_merging.errors import ProbeError

    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(zoo_dir / "base" / f, d / f)
    with pytest.raises(ExpertError, match="tokenizer in .*notok cannot be loaded"):
        MultimodalModel.load(d)
    # a tokenizer without a chat template: a clear error, not transformers' ValueError
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo_dir / "base"))
    tok.chat_template = None
    tok.save_pretrained(str(d))
    for f in d.glob("chat_template*"):
        f.unlink()
    with pytest.raises(ProbeError, match="no chat template"):
        MultimodalModel.load(d)


class _Boom:
    """Unpickling this object writes a marker file: proof that a checkpoint was unpickled."""

    marker: str = ""

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled!",))


def test_pickle_only_checkpoint_is_refused_without_unpickling(zoo_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    for f in (zoo_dir / "base").iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, d / f.name)
    marker = tmp_path / "marker.txt"
    boom = _Boom()
    boom.marker = str(marker)
    with (d / "pytorch_model.bin").open("wb") as fh:
        pickle.dump({"model.embed_tokens.weight": boom}, fh)
    with pytest.raises(ExpertError, match="only pickle weights \\(pytorch_model.bin\\)"):
        MultimodalModel.load(d)
    assert not marker.exists()
    # the adapter equivalent
    a = tmp_path / "adapter"
    a.mkdir()
    shutil.copy(zoo_dir / "cell" / "adapter_config.json", a)
    with (a / "adapter_model.bin").open("wb") as fh:
        pickle.dump({"x": boom}, fh)
    with pytest.raises(ExpertError, match="adapter_model.safetensors is missing"):
        MultimodalModel.load(zoo_dir / "base", adapters={"cell": a})
    assert not marker.exists()


def test_protein_encoder_position_embedding_round_trips(zoo_dir, tmp_path):
    """The zoo's protein encoder uses rotary positions (ESM-2's); the choice is saved in its config and
    a config naming another kind of positions than its weights were trained with is refused."""
    src = zoo_dir / "protein" / "encoder"
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["position_embedding"] == "rotary"
    enc = load_encoder(src)
    assert enc.position_embedding == "rotary"
    assert enc.esm.config.position_embedding_type == "rotary"
    out = enc(["MKVLAAGSGAFGEVRT"])
    assert out[0].shape == (18, enc.hidden_size)
    d = tmp_path / "absolute"
    shutil.copytree(src, d)
    (d / "config.json").write_text(json.dumps({**cfg, "position_embedding": "absolute"}))
    with pytest.raises(ExpertError, match="weights do not match its config"):
        load_encoder(d)
    (d / "config.json").write_text(json.dumps({**cfg, "position_embedding": "alibi"}))
    with pytest.raises(ExpertError, match=r"bad parameters \(position_embedding must be .absolute. or .rotary., not .alibi.\)"):
        load_encoder(d)
