"""`ties`: TIES-Merging (DESIGN 3, baselines), through peft's ``merge_utils.ties``.

Per tensor: (1) trim: keep each expert's top-k |delta| (k = density * numel, floored as peft does:
``int(density * numel)``; so a tensor with fewer than 1/density entries keeps none), (2) elect the
sign per entry by summed mass (peft ``majority_sign_method="total"``: sign of sum_e trimmed delta_e,
a zero sum counting as +), (3) disjoint mean: average over the experts whose trimmed, non-zero value
has the elected sign (entries where none agree are 0), (4) times lambda. peft applies the weight
after the sign election and before the disjoint mean; with one lambda for all experts that is
exactly lambda * disjoint mean, as DESIGN defines it.
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
        work = deltas.to(work_dtype(deltas))
        out = peft_quiet(
            merge_utils.ties, list(work.unbind(0)), expert_weights(work, self.scaling),
            density=self.density, majority_sign_method="total",
        )
        return out.to(deltas.dtype)
