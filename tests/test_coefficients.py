"""Hand-computed checks of es_merging.coefficients (DESIGN section 3). Arithmetic in comments."""
from __future__ import annotations

import math

import pytest
import torch

from es_merging.coefficients import (
    combine,
    element_coefficients,
    layer_coefficients,
    layer_increments,
    merge_weighted,
    sliced_wasserstein,
    standardize_pair,
    zscore,
)
from es_merging.errors import MergeError

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- standardize_pair


def test_standardize_pair_by_hand_with_constant_features():
    # feature 0: union {1, 3, 5}: mean 3, population var (4 + 0 + 4)/3 = 8/3, std sqrt(8/3)
    #   -> (1-3)/sqrt(8/3) = -sqrt(1.5), 0, +sqrt(1.5)
    # feature 1: union {5, 5, 5}: std 0 -> scale 1, centred to exactly 0
    # feature 2: union {0.1, 0.1, 0.1}: std 0 (0.1 is not representable: must still be exactly 0)
    x = t([[1.0, 5.0, 0.1], [3.0, 5.0, 0.1]])
    y = t([[5.0, 5.0, 0.1]])
    xs, ys = standardize_pair(x, y)
    a = math.sqrt(1.5)
    assert torch.allclose(xs, t([[-a, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-12)
    assert torch.allclose(ys, t([[a, 0.0, 0.0]]), atol=1e-12)
    assert torch.equal(xs[:, 1:], torch.zeros(2, 2, dtype=F64))  # exactly, not 1e-17 noise
    assert torch.equal(ys[:, 1:], torch.zeros(1, 2, dtype=F64))
    assert xs.shape == (2, 3) and ys.shape == (1, 3)


def test_standardize_pair_keeps_float32_and_rejects_mismatch():
    xs, ys = standardize_pair(torch.randn(4, 3, generator=gen()), torch.randn(2, 3, generator=gen(1)))
    assert xs.dtype == torch.float32 and ys.dtype == torch.float32
    union = torch.cat([xs, ys]).double()
    assert torch.allclose(union.mean(0), torch.zeros(3, dtype=F64), atol=1e-6)
    assert torch.allclose(union.std(0, unbiased=False), torch.ones(3, dtype=F64), atol=1e-6)
    with pytest.raises(MergeError, match="D=3.*D=2"):
        standardize_pair(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(MergeError, match="2-D"):
        standardize_pair(torch.zeros(3), torch.zeros(2, 3))


# --------------------------------------------------------------------------- sliced_wasserstein


def test_swd_identical_sets_is_zero():
    x = torch.randn(16, 5, generator=gen(3))
    assert sliced_wasserstein(x, x.clone(), num_projections=64, generator=gen()) == 0.0


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_swd_one_dimensional_shift_is_the_shift(p):
    # D = 1: every unit direction is +1 or -1, so sort(X th) and sort(Y th) differ by exactly c
    # in every slot -> (mean c^p)^(1/p) = c
    x = t([[0.0], [1.0], [5.0]])
    assert sliced_wasserstein(x, x + 2.5, num_projections=7, p=p, generator=gen()) == pytest.approx(2.5, rel=1e-12)
    assert sliced_wasserstein(x, x - 2.5, num_projections=7, p=p, generator=gen()) == pytest.approx(2.5, rel=1e-12)


def test_swd_one_dimensional_by_hand():
    # x = {0, 1}, y = {3, 1}: sorted x = (0, 1), sorted y = (1, 3) -> |diffs| = (1, 2)
    # (theta = -1 gives sorted (-1, 0) vs (-3, -1) -> the same |diffs| (2, 1))
    # p = 2: sqrt((1 + 4)/2) = sqrt(2.5);  p = 1: (1 + 2)/2 = 1.5
    x, y = t([[0.0], [1.0]]), t([[3.0], [1.0]])
    assert sliced_wasserstein(x, y, num_projections=5, p=2.0, generator=gen()) == pytest.approx(math.sqrt(2.5))
    assert sliced_wasserstein(x, y, num_projections=5, p=1.0, generator=gen()) == pytest.approx(1.5)


def test_swd_symmetric_and_reproducible():
    x = torch.randn(20, 6, generator=gen(1))
    y = torch.randn(13, 6, generator=gen(2)) + 0.7
    a = sliced_wasserstein(x, y, num_projections=50, generator=gen(5))
    b = sliced_wasserstein(y, x, num_projections=50, generator=gen(5))
    assert a == b  # same draws whichever set comes first
    assert sliced_wasserstein(x, y, num_projections=50, generator=gen(5)) == a
    assert sliced_wasserstein(x, y, num_projections=50, generator=gen(6)) != a
    # generator=None is deterministic too (seeded with 0)
    assert sliced_wasserstein(x, y, num_projections=50) == sliced_wasserstein(x, y, num_projections=50)
    assert a > 0


def test_swd_subsamples_the_larger_set_without_replacement():
    # x has 10 identical rows 0, y = {1, 2, 3}: any 3-row subsample of x is (0, 0, 0)
    # -> |diffs| (1, 2, 3) -> sqrt((1 + 4 + 9)/3) = sqrt(14/3)
    x, y = torch.zeros(10, 1, dtype=F64), t([[1.0], [2.0], [3.0]])
    assert sliced_wasserstein(x, y, num_projections=3, generator=gen()) == pytest.approx(math.sqrt(14 / 3))
    # x = {0, 1, 2, 3}, y = {0, 1, 2}: a 3-subset of x WITHOUT replacement gives sorted diffs
    # {0,1,2}->(0,0,0)->0, {0,1,3}->(0,0,1)->sqrt(1/3), {0,2,3}->(0,1,1)->sqrt(2/3), {1,2,3}->(1,1,1)->1
    # (with replacement e.g. {3,3,3} -> (3,2,1) -> sqrt(14/3) would appear)
    allowed = [0.0, math.sqrt(1 / 3), math.sqrt(2 / 3), 1.0]
    x4, y3 = t([[0.0], [1.0], [2.0], [3.0]]), t([[0.0], [1.0], [2.0]])
    seen = set()
    for seed in range(40):
        v = sliced_wasserstein(x4, y3, num_projections=2, generator=gen(seed))
        match = [a for a in allowed if abs(v - a) < 1e-12]
        assert match, v
        seen.add(match[0])
    assert len(seen) >= 3  # the subsample really varies with the seed


def test_swd_single_sample_and_scale_after_standardisation():
    assert sliced_wasserstein(t([[0.0]]), t([[3.0]]), generator=gen()) == pytest.approx(3.0)
    assert sliced_wasserstein(t([[1.0, 2.0]]), t([[1.0, 2.0]]), generator=gen()) == 0.0
    # no scaling inside: x10 scales the raw distance by 10 ...
    x, y = torch.randn(8, 4, generator=gen(1)), torch.randn(8, 4, generator=gen(2))
    raw = sliced_wasserstein(x, y, num_projections=32, generator=gen())
    assert sliced_wasserstein(10 * x, 10 * y, num_projections=32, generator=gen()) == pytest.approx(10 * raw, rel=1e-6)
    # ... while after joint standardisation the scale drops out
    s1 = sliced_wasserstein(*standardize_pair(x, y), num_projections=32, generator=gen())
    s10 = sliced_wasserstein(*standardize_pair(10 * x, 10 * y), num_projections=32, generator=gen())
    assert s1 == pytest.approx(s10, rel=1e-6)


def test_swd_validation():
    with pytest.raises(MergeError, match="feature dims differ"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(MergeError, match="num_projections"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 2), num_projections=0)
    with pytest.raises(MergeError, match="order p"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 2), p=0.5)
    with pytest.raises(MergeError, match="at least one sample"):
        sliced_wasserstein(torch.zeros(0, 2), torch.zeros(3, 2))


# --------------------------------------------------------------------------- increments, zscore


def test_layer_increments_rule_and_nan():
    # expert 0, modality 0: SWD (1, 3, 6) -> D = (1, 3-1, 6-3) = (1, 2, 3)
    # expert 0, modality 1: SWD (2, nan, 5) -> D = (2, nan-2, 5-nan) -> (2, 0, 0)
    # expert 1, modality 0: SWD (inf, 1, 1) -> D = (inf, 1-inf, 0) -> (0, 0, 0)
    # expert 1, modality 1: SWD (4, 4, 1) -> D = (4, 0, -3)
    swd = torch.empty(2, 3, 2, dtype=F64)
    swd[0, :, 0] = t([1.0, 3.0, 6.0])
    swd[0, :, 1] = t([2.0, float("nan"), 5.0])
    swd[1, :, 0] = t([float("inf"), 1.0, 1.0])
    swd[1, :, 1] = t([4.0, 4.0, 1.0])
    d = layer_increments(swd)
    assert torch.equal(d[0, :, 0], t([1.0, 2.0, 3.0]))
    assert torch.equal(d[0, :, 1], t([2.0, 0.0, 0.0]))
    assert torch.equal(d[1, :, 0], t([0.0, 0.0, 0.0]))
    assert torch.equal(d[1, :, 1], t([4.0, 0.0, -3.0]))
    with pytest.raises(MergeError, match=r"\[E, L, T\]"):
        layer_increments(torch.zeros(2, 3))


def test_zscore_uses_population_std_and_floor():
    # (0, 3, 6): mean 3, population var (9 + 0 + 9)/3 = 6 -> z = (-3, 0, 3)/sqrt(6) = (-1.2247, 0, 1.2247)
    # (the sample std, 3, would give (-1, 0, 1))
    z = zscore(t([[0.0, 3.0, 6.0], [2.0, 2.0, 2.0]]), dim=1)
    r = 3 / math.sqrt(6)
    assert torch.allclose(z[0], t([-r, 0.0, r]))
    # constant row: std 0 floored at 1e-12, deviations 0 -> all zeros (no NaN)
    assert torch.equal(z[1], torch.zeros(3, dtype=F64))


# --------------------------------------------------------------------------- layer_coefficients


def _example_delta_swd():
    # E = 2 experts, L = 3 layers, T = 2 modalities; own = (0, 1)
    d = torch.empty(2, 3, 2, dtype=F64)
    d[0, :, 0] = t([1.0, 2.0, 3.0])  # z = (-a, 0, a), a = 1/sqrt(2/3) = sqrt(1.5)
    d[0, :, 1] = t([0.0, 0.0, 3.0])  # mean 1, var (1 + 1 + 4)/3 = 2 -> z = (-1/sqrt2, -1/sqrt2, sqrt2)
    d[1, :, 0] = t([5.0, 5.0, 5.0])  # constant -> z = (0, 0, 0)
    d[1, :, 1] = t([3.0, 2.0, 1.0])  # z = (a, 0, -a)
    return d


def test_layer_coefficients_by_hand():
    a, r = math.sqrt(1.5), 1 / math.sqrt(2)
    alpha = 0.5
    # G[0] = Z[0,:,own=0] + alpha * Z[0,:,1] = (-a - alpha r, -alpha r, a + alpha * 2r)
    # G[1] = Z[1,:,own=1] + alpha * Z[1,:,0] = (a, 0, -a)
    g0 = [-a - alpha * r, -alpha * r, a + alpha * 2 * r]
    g1 = [a, 0.0, -a]
    for temp in (1.0, 0.5):
        lam = layer_coefficients(_example_delta_swd(), own=[0, 1], alpha=alpha, temperature=temp)
        # two experts: softmax = logistic of the difference: lam[0,l] = 1/(1 + exp((G1 - G0)/T))
        exp0 = [1 / (1 + math.exp((b - c) / temp)) for c, b in zip(g0, g1)]
        assert lam.shape == (2, 3)
        assert torch.allclose(lam[0], t(exp0), atol=1e-12)
        assert torch.allclose(lam[1], 1 - t(exp0), atol=1e-12)
    # literal values at T = 0.5: G0 - G1 = (-2a - r/2, -r/2, 2a + r) = (-2.803043, -0.353553, 3.156597)
    # /T -> (-5.606086, -0.707107, 6.313193) -> logistic -> (0.0036620, 0.3302384, 0.9981910)
    lam = layer_coefficients(_example_delta_swd(), own=[0, 1], alpha=alpha, temperature=0.5)
    assert torch.allclose(lam[0], t([0.0036620, 0.3302384, 0.9981910]), atol=1e-6)


def test_layer_coefficients_defaults_and_own_matters():
    # defaults alpha = 1, T = 0.5: G[0] = (-a - r, -r, a + 2r), G[1] = (a, 0, -a)
    a, r = math.sqrt(1.5), 1 / math.sqrt(2)
    lam = layer_coefficients(_example_delta_swd(), own=[0, 1])
    g0, g1 = [-a - r, -r, a + 2 * r], [a, 0.0, -a]
    assert torch.allclose(lam[0], t([1 / (1 + math.exp((b - c) / 0.5)) for c, b in zip(g0, g1)]), atol=1e-12)
    # alpha = 0 and own swapped for expert 0: G[0] = Z[0,:,1] = (-r, -r, 2r)
    lam2 = layer_coefficients(_example_delta_swd(), own=[1, 1], alpha=0.0, temperature=1.0)
    assert torch.allclose(lam2[0], t([1 / (1 + math.exp(b - c)) for c, b in zip([-r, -r, 2 * r], g1)]), atol=1e-12)


def test_layer_coefficients_temperature_limits():
    d = torch.randn(3, 4, 2, generator=gen(7), dtype=F64)
    hot = layer_coefficients(d, own=[0, 1, 0], temperature=1e9)
    assert torch.allclose(hot, torch.full((3, 4), 1 / 3, dtype=F64), atol=1e-8)  # uniform 1/E
    cold = layer_coefficients(d, own=[0, 1, 0], temperature=1e-6)
    ref = layer_coefficients(d, own=[0, 1, 0], temperature=1.0)
    onehot = torch.nn.functional.one_hot(ref.argmax(dim=0), 3).T.to(F64)
    assert torch.allclose(cold, onehot, atol=1e-8)  # one-hot on the argmax of G
    assert torch.allclose(ref.sum(0), torch.ones(4, dtype=F64))


def test_layer_coefficients_validation():
    d = torch.zeros(2, 3, 2)
    with pytest.raises(MergeError, match="E=2"):
        layer_coefficients(d, own=[0])
    with pytest.raises(MergeError, match="out of range"):
        layer_coefficients(d, own=[0, 2])
    with pytest.raises(MergeError, match="temperature"):
        layer_coefficients(d, own=[0, 1], temperature=0.0)
    with pytest.raises(MergeError, match=r"\[E, L, T\]"):
        layer_coefficients(torch.zeros(2, 3), own=[0, 1])


# --------------------------------------------------------------------------- element, combine, merge


def test_element_coefficients_by_hand():
    # expert 0 scores (1, 3): mean 2, population std 1 -> z = (-1, 1)
    # expert 1 scores (2, 2): constant -> z = (0, 0)
    # T = 1: w[0] = (e^-1/(e^-1 + 1), e/(e + 1)) = (1/(1+e), e/(1+e)) = (0.268941, 0.731059)
    s = t([[1.0, 3.0], [2.0, 2.0]])
    e = math.e
    w = element_coefficients(s, temperature=1.0)
    assert torch.allclose(w, t([[1 / (1 + e), e / (1 + e)], [e / (1 + e), 1 / (1 + e)]]), atol=1e-12)
    # default T = 0.1: z/T = (-10, 10) vs 0 -> w[0] = (1/(1+e^10), e^10/(1+e^10)) = (4.5398e-5, 0.9999546)
    w = element_coefficients(s)
    assert torch.allclose(w[0], t([1 / (1 + math.exp(10)), 1 / (1 + math.exp(-10))]), atol=1e-12)
    # z-scored per expert: scaling one expert's scores changes nothing
    assert torch.allclose(element_coefficients(t([[10.0, 30.0], [2.0, 2.0]])), w, atol=1e-12)


def test_element_coefficients_shape_and_population_std():
    # 3 experts, tensor 1x3; expert 0 (0, 3, 6) -> z = (-1.2247, 0, 1.2247) (population std sqrt6);
    # experts 1, 2 constant -> z = 0. T = 1: w[0, j] = e^z / (e^z + 2)
    s = t([[[0.0, 3.0, 6.0]], [[1.0, 1.0, 1.0]], [[4.0, 4.0, 4.0]]])
    w = element_coefficients(s, temperature=1.0)
    assert w.shape == (3, 1, 3)
    r = 3 / math.sqrt(6)
    assert torch.allclose(w[0, 0], t([math.exp(z) / (math.exp(z) + 2) for z in (-r, 0.0, r)]), atol=1e-12)
    assert torch.allclose(w.sum(0), torch.ones(1, 3, dtype=F64))
    # float32 in -> float32 out; bf16 promoted to float32
    assert element_coefficients(torch.rand(2, 4)).dtype == torch.float32
    assert element_coefficients(torch.rand(2, 4).bfloat16()).dtype == torch.float32
    with pytest.raises(MergeError, match="temperature"):
        element_coefficients(s, temperature=-1.0)


def test_combine_product_then_normalise():
    # omega = element * lam: [[0.5*0.25, 0.2*0.25], [0.5*0.75, 0.8*0.75]] = [[0.125, 0.05], [0.375, 0.6]]
    # column sums (0.5, 0.65) -> what = [[0.25, 0.05/0.65], [0.75, 0.6/0.65]] = [[0.25, 0.076923], [0.75, 0.923077]]
    element = t([[0.5, 0.2], [0.5, 0.8]])
    what = combine(element, t([0.25, 0.75]))
    assert torch.allclose(what, t([[0.125 / (0.5 + 1e-12), 0.05 / (0.65 + 1e-12)], [0.375 / (0.5 + 1e-12), 0.6 / (0.65 + 1e-12)]]), atol=1e-15)
    assert torch.allclose(what, t([[0.25, 0.0769231], [0.75, 0.9230769]]), atol=1e-7)
    # all-zero omega: the 1e-12 keeps it finite (what = 0, not NaN)
    assert torch.equal(combine(torch.zeros(2, 3, dtype=F64), t([0.5, 0.5])), torch.zeros(2, 3, dtype=F64))
    with pytest.raises(MergeError, match=r"layer_lambda must have shape \[E\]=\[2\]"):
        combine(element, t([0.2, 0.3, 0.5]))


def test_merge_weighted_by_hand():
    # phi_0 = (1, -2), phi_1 = (3, 4); what = [[0.25, 0.5], [0.75, 0.5]]
    # -> (0.25*1 + 0.75*3, 0.5*-2 + 0.5*4) = (2.5, 1.0)
    phi = t([[1.0, -2.0], [3.0, 4.0]])
    assert torch.allclose(merge_weighted(phi, t([[0.25, 0.5], [0.75, 0.5]])), t([2.5, 1.0]))
    # per-expert weights [E] broadcast: 0.25*(1,-2) + 0.75*(3,4) = (2.5, 2.5)
    assert torch.allclose(merge_weighted(phi, t([0.25, 0.75])), t([2.5, 2.5]))
    out = merge_weighted(phi.float(), t([0.25, 0.75]))
    assert out.dtype == torch.float32
    with pytest.raises(MergeError, match=r"weights shape \(2, 3\)"):
        merge_weighted(phi, torch.ones(2, 3))
