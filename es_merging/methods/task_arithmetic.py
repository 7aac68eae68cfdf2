"""`task_arithmetic`: theta_B + lambda * sum_e delta_e (DESIGN 3, baselines).

The tensor math is peft's ``merge_utils.task_arithmetic`` (it multiplies each task tensor by its
weight and sums); every expert gets the weight lambda, which is exactly lambda * sum_e delta_e.
The engine adds the base; this returns the merged delta.
"""
from __future__ import annotations

import torch
from peft.utils import merge_utils

from es_merging.methods.average import check_deltas, work_dtype
from es_merging.methods.base import MergeMethod, Param, TensorContext, register

# "lambda" is a Python keyword (get_method(..., lambda=...) would not parse), hence "scaling".
SCALING = Param(
    "scaling", float, 1.0,
    "lambda of DESIGN section 3: the merged delta is multiplied by it (the same factor for every "
    "expert; negative values subtract the experts, 'task negation')",
    min=-10.0, max=10.0,
)


def expert_weights(deltas: torch.Tensor, value: float) -> torch.Tensor:
    """peft's per-task weights: one value per expert, on the deltas' device and dtype."""
    return torch.full((deltas.shape[0],), float(value), dtype=deltas.dtype, device=deltas.device)


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "Task arithmetic: lambda * sum_e delta_e added to the base (peft merge_utils.task_arithmetic)."
    params = (SCALING,)

    def merge_tensor(self, deltas: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        check_deltas(deltas, ctx)
        work = deltas.to(work_dtype(deltas))
        out = merge_utils.task_arithmetic(list(work.unbind(0)), expert_weights(work, self.scaling))
        return out.to(deltas.dtype)
