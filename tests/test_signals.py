"""ES signals on the test-preset zoo: shapes, the per-layer gradient rule, and probe errors."""
from __future__ import annotations

import pytest
import torch

from es_merging.errors import MergeError
from es_merging.experts import load_expert_spec
from es_merging.methods import get_method
from es_merging.probe import Probe
from es_merging.signals import _decoder_layers, adapter_key, compute_signals, layer_of

EXPERTS = ("molecule", "protein", "cell")


@pytest.fixture(scope="module")
def specs(zoo_dir):
    return [load_expert_spec(zoo_dir / m) for m in EXPERTS]


@pytest.fixture(scope="module")
def probe(zoo_probe):
    p = Probe.load(zoo_probe)
    return p.model_copy(update={"samples": p.samples[:8]})


def test_signals_shapes_and_normalisation(zoo_dir, specs, probe):
    sig = compute_signals(zoo_dir / "base", specs, probe, mode="factor", method=get_method("es", num_projections=64),
                          seed=0, batch_size=4)
    n_layers = len(sig.lam[0])
    assert sig.swd.shape == (3, n_layers, 3) and sig.modalities == list(EXPERTS) and sig.own == [0, 1, 2]
    assert torch.allclose(sig.lam.sum(0), torch.ones(n_layers), atol=1e-5)  # softmax over experts
    assert (sig.swd > 0).all()  # every expert moves the hidden states somewhere
    assert sig.scores and all(v.shape[0] == 3 for v in sig.scores.values())
    assert all(".lora_" in k and layer_of(k) is not None for k in sig.scores)
    again = compute_signals(zoo_dir / "base", specs, probe, mode="factor", method=get_method("es", num_projections=64),
                            seed=0, batch_size=4)
    assert torch.equal(sig.lam, again.lam) and all(torch.equal(sig.scores[k], again.scores[k]) for k in sig.scores)


def test_element_scores_follow_the_per_layer_rule(zoo_dir, specs, probe):
    """S[e,k] = sum over batches |dLoss[e,l]/dphi_k| for phi_k in layer l only: recompute it with one
    autograd.grad per layer (no detach trick) and compare."""
    from es_merging.mllm import MultimodalModel

    sig = compute_signals(zoo_dir / "base", specs[:2], probe, mode="factor",
                          method=get_method("es_element"), seed=0, batch_size=8)
    model = MultimodalModel.load(zoo_dir / "base", adapters={s.name: s.path for s in specs[:2]},
                                 encoders={m: zoo_dir / m / "encoder" for m in ("molecule", "protein")})
    batch = model.collate([model.renderer.render(s) for s in probe.samples])
    model.set_adapter(None)
    with torch.no_grad():
        base_h = model.hidden_states(batch)[1:]
    name = "protein"
    model.set_adapter(name)
    params = {n: p for n, p in model.backbone.named_parameters() if "lora_" in n and f".{name}." in n}
    for p in params.values():
        p.requires_grad_(True)
    exp_h = model.hidden_states(batch)[1:]
    mask = batch.masks[name]
    assert len(_decoder_layers(model)) == len(exp_h)
    for layer in range(len(exp_h)):
        loss = (exp_h[layer] - base_h[layer])[mask].pow(2).mean()
        names = [n for n in params if layer_of(n) == layer]
        grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True)
        for n, g in zip(names, grads):
            torch.testing.assert_close(sig.scores[adapter_key(n, name)][1], g.abs(), rtol=1e-4, atol=1e-9)


def test_probe_without_an_experts_modality_is_refused(zoo_dir, specs, probe):
    no_cells = probe.model_copy(update={"samples": [s.model_copy(update={"cell": None}) for s in probe.samples]})
    with pytest.raises(MergeError, match="cell"):
        compute_signals(zoo_dir / "base", specs, no_cells, mode="factor", method=get_method("es"), seed=0)


def test_es_element_gets_uniform_unused_lambda(zoo_dir, specs, probe):
    sig = compute_signals(zoo_dir / "base", specs, probe, mode="factor", method=get_method("es_element"),
                          seed=0, batch_size=8)
    assert torch.allclose(sig.lam, torch.full_like(sig.lam, 1 / 3))
    assert sig.meta["layer_coefficients_used"] is False


def test_device_auto_resolves_without_a_gpu(zoo_dir):
    from es_merging.mllm import MultimodalModel

    model = MultimodalModel.load(zoo_dir / "base", device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == expected
