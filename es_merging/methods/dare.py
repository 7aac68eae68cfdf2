"""`dare_linear` and `dare_ties` (DESIGN 3, baselines), through peft's ``merge_utils``.

DARE drops each entry of each expert's delta with probability p (Bernoulli) and rescales the kept
ones by 1/(1-p). The parameter is ``density`` = 1 - p, the keep probability (the name peft and
mergekit use); density=1 (p=0) drops nothing, so dare_linear equals task_arithmetic and dare_ties
equals ties with density 1.
- dare_linear: lambda * sum_e dropped_e (peft ``dare_linear``).
- dare_ties:   sign election by summed mass + disjoint mean over agreeing experts, times lambda
               (peft ``dare_ties``; same election and mean as ``ties``, random instead of top-k trim).

Seeding: peft draws the Bernoulli masks from torch's global RNG, so the call runs inside a forked
RNG seeded with the per-tensor ``ctx.seed``: results are reproducible, independent of the order in
which the engine visits tensors, and the caller's global RNG state is left untouched.
"""
from __future__ import annotations

import contextlib

import torch
from peft.utils import merge_utils

from es_merging.methods.average import check_deltas, work_dtype
from es_merging.methods.base import MergeMethod, Param, TensorContext, register
from es_merging.methods.task_arithmetic import SCALING, expert_weights
from es_merging.methods.ties import peft_quiet

DARE_DENSITY = Param(
    "density", float, 0.5,
    "keep probability 1 - p of DARE's Bernoulli drop (kept entries are rescaled by 1/density); "
    "1.0 drops nothing; must be > 0 (DESIGN gives no default; 0.5)",
    min=1e-6, max=1.0,
)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """Fork the global RNG of ``device`` (CPU, or that one CUDA device) and seed it with ``seed``.

    Only the forked generators are seeded (not torch.manual_seed, which would also reseed every
    CUDA device for good, outside the fork)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


class _Dare(MergeMethod):
    params = (DARE_DENSITY, SCALING)
    _peft_fn: staticmethod
    _peft_kwargs: tuple[tuple[str, str], ...] = ()

    def merge_tensor(self, deltas: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        check_deltas(deltas, ctx)
        work = deltas.to(work_dtype(deltas))
        with seeded_global_rng(ctx.seed, work.device):
            out = peft_quiet(
                type(self)._peft_fn, list(work.unbind(0)), expert_weights(work, self.scaling),
                density=self.density, **dict(self._peft_kwargs),
            )
        return out.to(deltas.dtype)


@register
class DareLinear(_Dare):
    name = "dare_linear"
    summary = "DARE + task arithmetic: Bernoulli drop (p = 1 - density), rescale 1/density, lambda * sum (peft merge_utils.dare_linear)."
    _peft_fn = staticmethod(merge_utils.dare_linear)


@register
class DareTies(_Dare):
    name = "dare_ties"
    summary = "DARE + TIES: Bernoulli drop (p = 1 - density), rescale 1/density, sign election, disjoint mean, times lambda (peft merge_utils.dare_ties)."
    _peft_fn = staticmethod(merge_utils.dare_ties)
    _peft_kwargs = (("majority_sign_method", "total"),)  # elect the sign by summed mass
