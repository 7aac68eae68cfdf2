"""`average`: the uniform mean of the experts' deltas.

Also home of the two small helpers every method shares (validate the stacked deltas; work in
float32 at least and hand back the input dtype), so that all methods treat dtypes the same way.
"""
from __future__ import annotations

import torch

from es_merging.errors import MergeError
from es_merging.methods.base import MergeMethod, TensorContext, register


def check_deltas(deltas: torch.Tensor, ctx: TensorContext) -> None:
    """Deltas must be a floating [E, *shape] stack with E >= 1."""
    if deltas.dim() < 1 or deltas.shape[0] < 1:
        raise MergeError(f"tensor {ctx.key!r}: expected stacked deltas [E, *shape] with E >= 1, got {tuple(deltas.shape)}")
    if not deltas.dtype.is_floating_point:
        raise MergeError(f"tensor {ctx.key!r}: cannot merge a {deltas.dtype} tensor (floating point only)")


def work_dtype(deltas: torch.Tensor) -> torch.dtype:
    """bf16/fp16 inputs are merged in float32 (sums, masks and rescaling lose digits otherwise)."""
    return torch.float64 if deltas.dtype == torch.float64 else torch.float32


def uniform_average(deltas: torch.Tensor) -> torch.Tensor:
    """mean_e deltas[e], in the input dtype (shared with the ES family's non-layer rule)."""
    return deltas.to(work_dtype(deltas)).mean(dim=0).to(deltas.dtype)


@register
class Average(MergeMethod):
    name = "average"
    summary = "Uniform mean of the experts' deltas: (1/E) sum_e delta_e."
    params = ()

    def merge_tensor(self, deltas: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        check_deltas(deltas, ctx)
        return uniform_average(deltas)
