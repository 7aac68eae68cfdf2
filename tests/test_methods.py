"""Merge methods on small hand-computed vectors (DESIGN section 3), registry and parameters."""
from __future__ import annotations

import math

import pytest
import torch

from es_merging.coefficients import layer_coefficients
from es_merging.errors import MergeError
from es_merging.methods import REGISTRY, TensorContext, get_method

ALL = {"es", "es_layer", "es_element", "average", "task_arithmetic", "ties", "dare_linear", "dare_ties"}


def ctx(key="model.layers.0.self_attn.q_proj.weight", layer=0, seed=1234, **kw) -> TensorContext:
    return TensorContext(key=key, layer=layer, generator=torch.Generator().manual_seed(seed), seed=seed, **kw)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def merge(name, deltas, c=None, **params):
    return get_method(name, **params).merge_tensor(deltas, c or ctx())


# --------------------------------------------------------------------------- registry, params


def test_registry_has_every_method_with_flags_and_summary():
    assert set(REGISTRY) == ALL
    for name, cls in REGISTRY.items():
        assert cls.summary and "\n" not in cls.summary, name
        assert cls.needs_probe == name.startswith("es"), name
    assert REGISTRY["es"].needs_layer_coefficients and REGISTRY["es"].needs_element_scores
    assert REGISTRY["es_layer"].needs_layer_coefficients and not REGISTRY["es_layer"].needs_element_scores
    assert not REGISTRY["es_element"].needs_layer_coefficients and REGISTRY["es_element"].needs_element_scores


def test_describe_lists_params_with_defaults():
    d = REGISTRY["es"].describe()
    params = {p["name"]: p for p in d["params"]}
    assert set(params) == {"temperature_layer", "temperature_element", "alpha", "num_projections", "p", "score"}
    assert params["temperature_layer"]["default"] == 0.5 and params["temperature_element"]["default"] == 0.1
    assert params["alpha"]["default"] == 1.0 and params["num_projections"] == {**params["num_projections"], "default": 1024, "type": "int", "min": 1}
    assert params["p"]["default"] == 2.0 and params["score"]["choices"] == ["grad_abs", "grad2"]
    assert d["needs_probe"] is True
    ties = {p["name"]: p for p in REGISTRY["ties"].describe()["params"]}
    assert ties["density"]["default"] == 0.2 and ties["scaling"]["default"] == 1.0
    assert {p["name"] for p in REGISTRY["dare_ties"].describe()["params"]} == {"density", "scaling"}
    assert REGISTRY["average"].describe()["params"] == []
    for cls in REGISTRY.values():
        for p in cls.describe()["params"]:
            assert p["help"], (cls.name, p["name"])


def test_parameter_errors_name_the_problem():
    with pytest.raises(MergeError, match="unknown merge method 'nope'.*'ties'"):
        get_method("nope")
    with pytest.raises(MergeError, match="'ties' has no parameter 'densty'"):
        get_method("ties", densty=0.3)
    with pytest.raises(MergeError, match="'density'=1.5 is above its maximum 1.0"):
        get_method("ties", density=1.5)
    with pytest.raises(MergeError, match="'temperature_layer'=0.0 is below its minimum"):
        get_method("es", temperature_layer=0.0)
    with pytest.raises(MergeError, match="'num_projections': 'many' is not a valid int"):
        get_method("es", num_projections="many")
    with pytest.raises(MergeError, match="'num_projections': 2.5 is not a valid int"):
        get_method("es", num_projections=2.5)
    with pytest.raises(MergeError, match="'score'='grad3' must be one of"):
        get_method("es", score="grad3")
    with pytest.raises(MergeError, match="'density'=0.0 is below its minimum"):
        get_method("dare_linear", density=0.0)
    # a parameter of another family member is refused, not ignored
    with pytest.raises(MergeError, match="'es_element' has no parameter 'temperature_layer'"):
        get_method("es_element", temperature_layer=1.0)
    # CLI strings are parsed by the declaration
    m = get_method("es", temperature_layer="0.25", num_projections="64", score="grad2")
    assert (m.temperature_layer, m.num_projections, m.score) == (0.25, 64, "grad2")


# --------------------------------------------------------------------------- baselines


D3 = t([[1.0, -2.0, 0.5, 3.0, -0.1],
        [-1.5, 0.2, 2.5, -2.0, 0.4],
        [0.5, -1.0, -0.2, 4.0, 0.6]])


def test_average_and_task_arithmetic_by_hand():
    # mean over experts: ((1-1.5+0.5)/3, (-2+0.2-1)/3, (0.5+2.5-0.2)/3, (3-2+4)/3, (-0.1+0.4+0.6)/3)
    assert torch.allclose(merge("average", D3), t([0.0, -2.8 / 3, 2.8 / 3, 5 / 3, 0.3]), atol=1e-6)
    # sums (0, -2.8, 2.8, 5, 0.9); lambda = 0.5 -> (0, -1.4, 1.4, 2.5, 0.45)
    assert torch.allclose(merge("task_arithmetic", D3), t([0.0, -2.8, 2.8, 5.0, 0.9]), atol=1e-6)
    assert torch.allclose(merge("task_arithmetic", D3, scaling=0.5), t([0.0, -1.4, 1.4, 2.5, 0.45]), atol=1e-6)


def test_ties_trim_elect_disjoint_mean_by_hand():
    # density 0.4 of 5 entries -> k = 2 per expert (largest |delta|):
    #   e0 ( 1, -2,  .5,  3, -.1) -> (0, -2, 0,   3, 0)
    #   e1 (-1.5, .2, 2.5, -2, .4) -> (0,  0, 2.5, -2, 0)
    #   e2 ( .5, -1, -.2,  4, .6) -> (0, -1, 0,   4, 0)
    # elected sign = sign of the summed trimmed mass: (0 -> +, -3 -> -, 2.5 -> +, 5 -> +, 0 -> +)
    # disjoint mean over agreeing non-zero entries:
    #   idx0 none -> 0; idx1 (-2, -1) -> -1.5; idx2 (2.5) -> 2.5; idx3 (3, 4), e1's -2 left out -> 3.5; idx4 none -> 0
    expected = t([0.0, -1.5, 2.5, 3.5, 0.0])
    assert torch.allclose(merge("ties", D3, density=0.4), expected)
    # times lambda
    assert torch.allclose(merge("ties", D3, density=0.4, scaling=0.5), 0.5 * expected)


def test_ties_elects_by_mass_not_by_count():
    # one entry, no trim (density 1): values (5, -1, -1): summed mass +3 -> '+' although two of three
    # are negative -> disjoint mean over the single positive expert = 5
    assert torch.allclose(merge("ties", t([[5.0], [-1.0], [-1.0]]), density=1.0), t([5.0]))
    # default density 0.2 of 10 entries keeps k = 2 per expert
    d = torch.zeros(2, 10)
    d[0, :3] = t([3.0, 2.0, 1.0])  # keeps 3, 2
    d[1, 1:4] = t([-5.0, 4.0, 0.5])  # keeps -5, 4
    # idx0: 3 -> 3; idx1: 2 - 5 = -3 -> '-' -> -5; idx2: 4 -> 4; rest 0
    assert torch.allclose(merge("ties", d), t([3.0, -5.0, 4.0] + [0.0] * 7))


def test_dare_reproducible_rescaled_and_order_independent():
    deltas = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(0))
    for name in ("dare_linear", "dare_ties"):
        torch.manual_seed(1)
        state = torch.get_rng_state()
        a = merge(name, deltas, ctx(seed=7), density=0.3)
        assert torch.equal(torch.get_rng_state(), state)  # caller's global RNG untouched
        torch.manual_seed(999)  # a different global state must not matter
        _ = torch.rand(5)
        assert torch.equal(merge(name, deltas, ctx(seed=7), density=0.3), a)
        assert not torch.equal(merge(name, deltas, ctx(seed=8), density=0.3), a)


def test_dare_linear_keeps_or_drops_and_rescales():
    # one expert: every output entry is 0 (dropped) or delta / density (kept, rescaled by 1/(1-p))
    delta = torch.arange(1, 2001, dtype=torch.float32).view(1, -1)
    out = merge("dare_linear", delta, density=0.25)[None]
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] / 0.25)
    assert 0.2 < kept.float().mean().item() < 0.3  # Bernoulli keep rate ~ density
    # two experts with lambda: entries in {0, l*d0/q, l*d1/q, l*(d0+d1)/q}, q = density
    d = torch.stack([torch.full((4000,), 1.0), torch.full((4000,), 10.0)])
    out = merge("dare_linear", d, density=0.5, scaling=2.0)
    assert set(out.unique().tolist()) == {0.0, 4.0, 40.0, 44.0}
    # expectation preserved: mean of 1/q-rescaled Bernoulli(q) draws of ones ~ 1
    ones = torch.ones(1, 100_000)
    assert merge("dare_linear", ones, density=0.25).mean().item() == pytest.approx(1.0, abs=0.03)


def test_dare_with_no_drop_equals_task_arithmetic_and_ties():
    # density = 1 - p = 1 (p = 0): nothing dropped, rescale 1/1
    assert torch.allclose(merge("dare_linear", D3, density=1.0, scaling=0.7), merge("task_arithmetic", D3, scaling=0.7))
    assert torch.allclose(merge("dare_ties", D3, density=1.0), merge("ties", D3, density=1.0))
    # ties at density 1 by hand: column sums (0, -2.8, 2.8, 5, 0.9) -> signs (+, -, +, +, +)
    #   idx0 (+): (1, .5) -> .75;  idx1 (-): (-2, -1) -> -1.5;  idx2 (+): (.5, 2.5) -> 1.5;
    #   idx3 (+): (3, 4) -> 3.5;   idx4 (+): (.4, .6) -> .5
    assert torch.allclose(merge("dare_ties", D3, density=1.0), t([0.75, -1.5, 1.5, 3.5, 0.5]))


def test_baselines_keep_dtype_and_shape():
    d = torch.randn(2, 3, 4).bfloat16()
    for name in ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        out = merge(name, d)
        assert out.shape == (3, 4) and out.dtype == torch.bfloat16, name


# --------------------------------------------------------------------------- ES family


def test_es_two_experts_by_hand():
    # deltas d0 = (1, -2), d1 = (3, 4); lam = (0.25, 0.75)
    # scores s0 = (1, 3) -> z (-1, 1); s1 = (2, 2) -> z (0, 0); T_E = 1:
    #   w0 = (a, 1-a), w1 = (1-a, a) with a = 1/(1+e) = 0.268941
    # what0 = 0.25 w0 / (0.25 w0 + 0.75 w1):
    #   entry 0: 0.25a / (0.25a + 0.75(1-a)) = 0.067235 / 0.615529 = 0.109232
    #   entry 1: 0.25(1-a) / (0.25(1-a) + 0.75a) = 0.182765 / 0.384471 = 0.475367
    # merged = what0 d0 + (1 - what0) d1
    deltas = t([[1.0, -2.0], [3.0, 4.0]])
    c = ctx(layer_lambda=t([0.25, 0.75]), element_scores=t([[1.0, 3.0], [2.0, 2.0]]))
    a = 1 / (1 + math.e)
    w00 = 0.25 * a / (0.25 * a + 0.75 * (1 - a))
    w01 = 0.25 * (1 - a) / (0.25 * (1 - a) + 0.75 * a)
    assert w00 == pytest.approx(0.109232, abs=1e-6) and w01 == pytest.approx(0.475367, abs=1e-6)
    expected = t([w00 * 1 + (1 - w00) * 3, w01 * -2 + (1 - w01) * 4])
    assert torch.allclose(merge("es", deltas, c, temperature_element=1.0), expected, atol=1e-6)
    assert "element_coefficients" in c.extras and c.extras.get("rule") is None
    # es_layer: lam only -> 0.25 d0 + 0.75 d1 = (0.25 + 2.25, -0.5 + 3) = (2.5, 2.5)
    assert torch.allclose(merge("es_layer", deltas, c), t([2.5, 2.5]), atol=1e-6)
    # es_element: w only -> (a*1 + (1-a)*3, (1-a)*-2 + a*4)
    assert torch.allclose(merge("es_element", deltas, c, temperature_element=1.0),
                          t([a + (1 - a) * 3, (1 - a) * -2 + a * 4]), atol=1e-6)


def test_es_three_experts_and_high_temperatures_reduce_to_average():
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(3, 6, 5, generator=g)
    scores = torch.rand(3, 6, 5, generator=g)
    # es_layer with lam = (0.2, 0.3, 0.5): what = lam / (1 + 1e-12) -> 0.2 d0 + 0.3 d1 + 0.5 d2
    c = ctx(layer_lambda=t([0.2, 0.3, 0.5]), element_scores=scores)
    assert torch.allclose(merge("es_layer", deltas, c), 0.2 * deltas[0] + 0.3 * deltas[1] + 0.5 * deltas[2], atol=1e-6)
    # very high T_L and T_E: lam -> 1/3, w -> 1/3, what -> 1/3 -> the uniform average
    m = get_method("es", temperature_layer=1e6, temperature_element=1e6)
    lam = m.layer_coefficients(torch.randn(3, 4, 3, generator=g), own=[0, 1, 2])
    assert torch.allclose(lam, torch.full((3, 4), 1 / 3), atol=1e-5)
    out = m.merge_tensor(deltas, ctx(layer=2, layer_lambda=lam[:, 2], element_scores=scores))
    assert torch.allclose(out, deltas.mean(0), atol=1e-5)


def test_es_layer_coefficients_helper_uses_the_method_params():
    d = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(4))
    m = get_method("es", alpha=0.3, temperature_layer=2.0)
    assert torch.equal(m.layer_coefficients(d, [1, 0]), layer_coefficients(d, [1, 0], alpha=0.3, temperature=2.0))
    with pytest.raises(MergeError, match="uses no layer coefficients"):
        get_method("es_element").layer_coefficients(d, [1, 0])


def test_es_non_layer_tensor_is_declared_average():
    deltas = t([[1.0, 2.0], [3.0, 6.0]])
    for name in ("es", "es_layer", "es_element"):
        c = ctx(key="model.embed_tokens.weight", layer=None)
        assert torch.allclose(merge(name, deltas, c), t([2.0, 4.0]))
        assert c.extras["rule"] == "non_layer_average"


def test_es_missing_or_misshaped_signals_name_the_tensor():
    deltas = torch.zeros(2, 3)
    key = "model.layers.1.mlp.up_proj.lora_A.weight"
    with pytest.raises(MergeError, match=f"{key}.*needs layer coefficients"):
        merge("es", deltas, ctx(key=key, layer=1, element_scores=torch.ones(2, 3)))
    with pytest.raises(MergeError, match=f"{key}.*needs element scores"):
        merge("es", deltas, ctx(key=key, layer=1, layer_lambda=t([0.5, 0.5])))
    with pytest.raises(MergeError, match=f"{key}.*needs element scores"):
        merge("es_element", deltas, ctx(key=key, layer=1))
    with pytest.raises(MergeError, match=f"{key}.*needs layer coefficients"):
        merge("es_layer", deltas, ctx(key=key, layer=1))
    with pytest.raises(MergeError, match=rf"{key}.*shape \(3,\), expected \[2\]"):
        merge("es_layer", deltas, ctx(key=key, layer=1, layer_lambda=t([0.2, 0.3, 0.5])))
    with pytest.raises(MergeError, match=rf"{key}.*element scores have shape \(2, 4\)"):
        merge("es_element", deltas, ctx(key=key, layer=1, element_scores=torch.ones(2, 4)))
    # es_layer does not need scores, es_element does not need lam
    merge("es_layer", deltas, ctx(key=key, layer=1, layer_lambda=t([0.5, 0.5])))
    merge("es_element", deltas, ctx(key=key, layer=1, element_scores=torch.ones(2, 3)))


def test_ties_frugal_path_equals_peft_on_a_large_tensor():
    """Above FRUGAL_MIN_NUMEL the bounded-memory TIES must give peft's result (continuous random
    data: no exact magnitude ties at the threshold)."""
    from peft.utils import merge_utils

    from es_merging.methods import ties as ties_module

    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 2048, 2049, generator=g)  # > 2**22 entries per expert
    assert deltas[0].numel() >= ties_module.FRUGAL_MIN_NUMEL
    weights = torch.full((3,), 0.7)
    expected = merge_utils.ties(list(deltas.clone().unbind(0)), weights, density=0.2, majority_sign_method="total")
    method = get_method("ties", density=0.2, scaling=0.7)
    ctx = TensorContext(key="model.layers.0.mlp.up_proj.weight", layer=0, generator=torch.Generator(), seed=0)
    got = method.merge_tensor(deltas.clone(), ctx)
    assert torch.equal(got, expected)
