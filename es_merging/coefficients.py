"""ES-Merging coefficients (DESIGN section 3): pure tensor functions, tensors in and out, no I/O.

Layer-wise (coarse) signal:
    standardize_pair -> sliced_wasserstein -> layer_increments -> layer_coefficients
Element-wise (fine) signal:
    element_coefficients
Combination and merge:
    combine -> merge_weighted

These names and signatures are a contract: the engine, the signals module and agents' notebooks
call them directly. Every shape problem raises ``MergeError`` naming the mismatch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from es_merging.errors import MergeError

__all__ = [
    "standardize_pair",
    "sliced_wasserstein",
    "layer_increments",
    "zscore",
    "layer_coefficients",
    "element_coefficients",
    "combine",
    "merge_weighted",
]

STD_FLOOR = 1e-12  # z-score std floor (DESIGN: "floored at 1e-12")
NORM_EPS = 1e-12  # what = omega / (sum_e omega + 1e-12)


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Common floating dtype of the inputs (integer inputs -> float64)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.float64


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 at least: softmax/z-scores in bf16 lose too much; float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_temperature(temperature: float, what: str) -> float:
    t = float(temperature)
    if not (t > 0 and t != float("inf")):
        raise MergeError(f"{what} temperature must be a finite number > 0, got {temperature!r}")
    return t


# --------------------------------------------------------------------------- layer-wise signal


def _check_pair(fn: str, unit: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """The shape contract shared by the two point-set functions: [N, D] and [M, D], N, M >= 1."""
    if x.dim() != 2 or y.dim() != 2:
        raise MergeError(f"{fn}: expected 2-D [N, D] and [M, D], got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise MergeError(f"{fn}: feature dims differ: x has D={x.shape[1]}, y has D={y.shape[1]}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise MergeError(f"{fn}: need at least one {unit} in each set, got N={x.shape[0]}, M={y.shape[0]}")


def standardize_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jointly standardise two sample sets per feature (DESIGN 3, layer step 2).

    x: [N, D], y: [M, D]. Mean and population std (ddof=0) are taken over the union of the N + M rows.
    A feature with zero spread keeps scale 1 and is centred exactly to 0.
    Computed in float64, returned in the inputs' common floating dtype.
    """
    _check_pair("standardize_pair", "row", x, y)
    out_dtype = _float_dtype(x, y)
    both = torch.cat([x.to(torch.float64), y.to(x.device, torch.float64)])
    lo, hi = both.amin(dim=0), both.amax(dim=0)
    constant = lo == hi
    # A constant feature: use its value as the mean so the centred value is exactly 0 (a float
    # mean of identical values can be off by one ulp and would leave 1e-17 noise).
    mean = torch.where(constant, lo, both.mean(dim=0))
    std = both.std(dim=0, unbiased=False)
    std = torch.where(constant | (std == 0), torch.ones_like(std), std)
    n = x.shape[0]
    z = (both - mean) / std
    return z[:n].to(out_dtype), z[n:].to(y.device, out_dtype)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    num_projections: int = 1024,
    p: float = 2.0,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein distance of order p between two point sets (DESIGN 3, layer step 2).

    ``SWD = ( mean_k mean_i |sort(X th_k)_i - sort(Y th_k)_i|^p )^(1/p)`` over ``num_projections``
    random unit directions th_k. No scaling inside: standardise first with ``standardize_pair``.
    Unequal sizes: the larger set is subsampled without replacement to the smaller size.
    Random draws (in this order: subsample indices, then directions) come from ``generator``;
    ``None`` means a CPU generator seeded with 0, so the value is always reproducible.
    N = M = 1 is allowed (one sorted pair per direction).
    """
    _check_pair("sliced_wasserstein", "sample", x, y)
    if isinstance(num_projections, bool) or int(num_projections) != num_projections or num_projections < 1:
        raise MergeError(f"sliced_wasserstein: num_projections must be an integer >= 1, got {num_projections!r}")
    p = float(p)
    if not (1.0 <= p < float("inf")):
        raise MergeError(f"sliced_wasserstein: order p must be a finite number >= 1, got {p!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    gdev = generator.device

    # float64 on CPU: the point sets are pooled hidden states (small), and sorting many projections
    # in float32 loses digits when the two sets are close.
    xs = x.detach().to("cpu", torch.float64)
    ys = y.detach().to("cpu", torch.float64)
    n = min(xs.shape[0], ys.shape[0])
    # Subsample whichever set is larger (the draw does not depend on argument order: symmetric).
    if xs.shape[0] > n:
        xs = xs[torch.randperm(xs.shape[0], generator=generator, device=gdev)[:n].cpu()]
    if ys.shape[0] > n:
        ys = ys[torch.randperm(ys.shape[0], generator=generator, device=gdev)[:n].cpu()]

    d = xs.shape[1]
    theta = torch.randn(int(num_projections), d, generator=generator, device=gdev, dtype=torch.float64).cpu()
    theta = theta / theta.norm(dim=1, keepdim=True).clamp_min(1e-300)
    px = torch.sort(xs @ theta.T, dim=0).values  # [n, K]
    py = torch.sort(ys @ theta.T, dim=0).values
    return float((px - py).abs().pow(p).mean().pow(1.0 / p))


def layer_increments(swd: torch.Tensor) -> torch.Tensor:
    """Layer increments (DESIGN 3, layer step 3): swd [E, L, T] -> D [E, L, T].

    D[:, 0] = swd[:, 0]; D[:, l] = swd[:, l] - swd[:, l-1]; any NaN/inf in D becomes 0.
    """
    if swd.dim() != 3:
        raise MergeError(f"layer_increments: expected swd of shape [E, L, T], got {tuple(swd.shape)}")
    swd = swd.to(_float_dtype(swd))
    d = torch.cat([swd[:, :1], swd[:, 1:] - swd[:, :-1]], dim=1)
    return torch.where(torch.isfinite(d), d, torch.zeros_like(d))


def zscore(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """(x - mean) / max(std, 1e-12) along ``dim`` with the population std (ddof=0)."""
    x = x.to(_float_dtype(x))
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, unbiased=False, keepdim=True).clamp_min(STD_FLOOR)
    return (x - mean) / std


def layer_coefficients(
    delta_swd: torch.Tensor,
    own: Sequence[int],
    alpha: float = 1.0,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Layer coefficients lam[E, L] (DESIGN 3, layer steps 4-6).

    delta_swd: [E, L, T] layer increments; own[e]: the modality index (into T) of expert e.
        Z[e, :, t] = zscore over layers of delta_swd[e, :, t]
        G[e, l]    = Z[e, l, own(e)] + alpha * sum_{t != own(e)} Z[e, l, t]
        lam[:, l]  = softmax over experts of G[:, l] / temperature
    Computed in float64, returned in delta_swd's floating dtype.
    """
    if delta_swd.dim() != 3:
        raise MergeError(f"layer_coefficients: expected delta_swd of shape [E, L, T], got {tuple(delta_swd.shape)}")
    n_exp, _, n_mod = delta_swd.shape
    own = [int(o) for o in own]
    if len(own) != n_exp:
        raise MergeError(f"layer_coefficients: own lists {len(own)} modalities but delta_swd has E={n_exp} experts")
    bad = [(e, o) for e, o in enumerate(own) if not 0 <= o < n_mod]
    if bad:
        raise MergeError(f"layer_coefficients: own modality index out of range [0, {n_mod}) for (expert, index) {bad}")
    temperature = _check_temperature(temperature, "layer")
    alpha = float(alpha)
    if alpha != alpha or abs(alpha) == float("inf"):
        raise MergeError(f"layer_coefficients: alpha must be finite, got {alpha!r}")

    out_dtype = _float_dtype(delta_swd)
    z = zscore(delta_swd.to(torch.float64), dim=1)  # [E, L, T]
    idx = torch.tensor(own, device=z.device).view(n_exp, 1, 1).expand(n_exp, z.shape[1], 1)
    z_own = z.gather(2, idx).squeeze(2)  # [E, L]
    g = z_own + alpha * (z.sum(dim=2) - z_own)
    return torch.softmax(g / temperature, dim=0).to(out_dtype)


# --------------------------------------------------------------------------- element-wise signal


def element_coefficients(scores: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Element coefficients w[E, *shape] of one tensor (DESIGN 3, element step 3).

    scores: [E, *shape] gradient scores S[e, k]. Each expert's tensor is z-scored over its own
    entries (population std floored at 1e-12), then w = softmax over experts of z / temperature.
    """
    if scores.dim() < 1 or scores.shape[0] < 1:
        raise MergeError(f"element_coefficients: expected scores of shape [E, *shape] with E >= 1, got {tuple(scores.shape)}")
    temperature = _check_temperature(temperature, "element")
    n_exp = scores.shape[0]
    flat = scores.reshape(n_exp, -1).to(_work_dtype(scores))
    if flat.shape[1] == 0:
        return flat.reshape(scores.shape)
    z = zscore(flat, dim=1)
    z.div_(temperature)
    return torch.softmax(z, dim=0).reshape(scores.shape)


# --------------------------------------------------------------------------- combination


def combine(element: torch.Tensor, layer_lambda: torch.Tensor) -> torch.Tensor:
    """Normalised merge weights what[E, *shape] (DESIGN 3, combination).

    omega[e] = element[e] * layer_lambda[e];  what = omega / (sum_e omega + 1e-12).
    layer_lambda: [E], the layer coefficients of this tensor's layer.
    """
    if element.dim() < 1:
        raise MergeError("combine: element must have shape [E, *shape], got a scalar")
    n_exp = element.shape[0]
    if layer_lambda.dim() != 1 or layer_lambda.shape[0] != n_exp:
        raise MergeError(
            f"combine: layer_lambda must have shape [E]=[{n_exp}] to match element {tuple(element.shape)}, "
            f"got {tuple(layer_lambda.shape)}"
        )
    dtype = torch.promote_types(_work_dtype(element), _work_dtype(layer_lambda))
    lam = layer_lambda.to(element.device, dtype).view((n_exp,) + (1,) * (element.dim() - 1))
    omega = element.to(dtype) * lam
    return omega / (omega.sum(dim=0, keepdim=True) + NORM_EPS)


def merge_weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_e weights[e] * tensors[e]; weights is [E, *shape] (per element) or [E] (per expert).

    Returned in tensors' dtype; the product is taken in float32 at least.
    """
    if tensors.dim() < 1:
        raise MergeError("merge_weighted: tensors must have shape [E, *shape], got a scalar")
    n_exp = tensors.shape[0]
    if weights.dim() == 1 and weights.shape[0] == n_exp:
        weights = weights.view((n_exp,) + (1,) * (tensors.dim() - 1))
    elif weights.shape != tensors.shape:
        raise MergeError(
            f"merge_weighted: weights shape {tuple(weights.shape)} matches neither tensors {tuple(tensors.shape)} "
            f"nor [E]=[{n_exp}]"
        )
    dtype = torch.promote_types(_work_dtype(tensors), _work_dtype(weights))
    out = (tensors.to(dtype) * weights.to(tensors.device, dtype)).sum(dim=0)
    return out.to(tensors.dtype) if tensors.dtype.is_floating_point else out
