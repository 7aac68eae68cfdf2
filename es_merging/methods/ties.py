"""`ties`: TIES-Merging (DESIGN 3, baselines), through peft's ``merge_utils.ties``.

Per tensor: (1) trim: keep each expert's top-k |delta| (k = density * numel, floored as peft does:
``int(density * numel)``; so a tensor with fewer than 1/density entries keeps none), (2) elect the
sign per entry by summed mass (peft ``majority_sign_method="total"``: sign of sum_e trimmed delta_e,
a zero sum counting as +), (3) disjoint mean: average over the experts whose trimmed, non-zero value
has the elected sign (entries where none agree are 0), (4) times lambda. peft applies the weight
after the sign election and before the disjoint mean; with one lambda for all experts that is
exactly lambda * disjoint mean, as DESIGN defines it.

Large tensors take a frugal path with the same arithmetic: peft's version allocates about 16
tensors' worth of temporaries (a 3 x 1.5 GB dense merge peaked at 2.85 GB RSS against the 1.5 GB
bound, and its ``topk`` was 8x slower). Above ``FRUGAL_MIN_NUMEL`` entries the threshold comes from
numpy's in-place ``partition`` and the sign election runs in 1M-entry chunks (peak: under one extra
tensor; measured 0.96 GB and 0.39x mergekit's time on that merge). tests/test_methods.py checks it
equals peft's result bit for bit (except where magnitudes tie exactly at the threshold, where peft's
``topk`` keeps an arbitrary subset and this keeps all of them).
"""
from __future__ import annotations

import warnings

import torch
from peft.utils import merge_utils

from es_merging.methods.average import check_deltas, work_dtype
from es_merging.methods.base import MergeMethod, Param, TensorContext, register
from es_merging.methods.task_arithmetic import SCALING, expert_weights

TIES_DENSITY = Param(
    "density", float, 0.2,
    "fraction of each expert's entries kept by magnitude (top-k, k = floor(density * numel)); DESIGN's k=20%",
    min=0.0, max=1.0,
)


def peft_quiet(fn, *args, **kwargs):
    """Call a peft merge function without its 'density >= 1, no pruning' warning (density=1 is a
    legitimate setting here: it means no trimming)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The density .* no pruning will be performed")
        return fn(*args, **kwargs)


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "TIES: trim to top-k |delta| per expert, elect sign by summed mass, disjoint mean, times lambda (peft merge_utils.ties)."
    params = (TIES_DENSITY, SCALING)

    def merge_tensor(self, deltas: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        check_deltas(deltas, ctx)
        if deltas[0].numel() >= FRUGAL_MIN_NUMEL and deltas.dtype == torch.float32:
            return ties_frugal(deltas, self.density, self.scaling)  # trims ``deltas`` in place (engine contract)
        work = deltas.to(work_dtype(deltas))
        out = peft_quiet(
            merge_utils.ties, list(work.unbind(0)), expert_weights(work, self.scaling),
            density=self.density, majority_sign_method="total",
        )
        return out.to(deltas.dtype)


FRUGAL_MIN_NUMEL = 1 << 22
_CHUNK = 1 << 20


def ties_frugal(deltas: torch.Tensor, density: float, scaling: float = 1.0) -> torch.Tensor:
    """TIES with bounded memory; modifies ``deltas`` (float32, [E, *shape]) in place."""
    n_experts = deltas.shape[0]
    flat = deltas.reshape(n_experts, -1)
    n = flat.shape[1]
    k = int(density * n)
    if density < 1:
        for e in range(n_experts):
            row = flat[e]
            if k == 0:
                row.zero_()
                continue
            mags = row.abs()
            arr = mags.numpy()
            arr.partition(n - k)  # in place: the k largest magnitudes end up at [n - k:]
            threshold = float(arr[n - k])
            del arr
            torch.abs(row, out=mags)
            row.mul_(mags.ge_(threshold))
            del mags
    out = torch.empty(n, dtype=flat.dtype)
    for start in range(0, n, _CHUNK):
        block = flat[:, start:start + _CHUNK]
        sign = block.sum(dim=0).ge_(0).to(flat.dtype).mul_(2).sub_(1)  # zero sum counts as +
        agree = (block * sign).gt_(0)
        total = ((block * scaling if scaling != 1.0 else block) * agree).sum(dim=0)
        out[start:start + _CHUNK] = total.div_(agree.sum(dim=0, dtype=flat.dtype).clamp_(min=1.0))
    return out.view(deltas.shape[1:])
