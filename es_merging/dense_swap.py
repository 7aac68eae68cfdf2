"""Swap a dense expert's checkpoint into a loaded base backbone in place, and back.

ES signals need the base and every expert forward on the same inputs. For LoRA experts that is an
adapter switch; a dense expert is a full checkpoint, and loading E of them beside the base would
cost E + 1 models. Instead its tensors are copied over the base's (one safetensors tensor at a
time) and the base's own values, saved before, are copied back on exit — on exceptions too, so a
failed signal pass never leaves an expert's weights in the base. Peak: the base plus one saved
copy (kept on the CPU, so a GPU holds one model only).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from es_merging.errors import MergeError
from es_merging.experts import ExpertSpec, checkpoint_files, iter_tensor_meta


def live_tensors(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint key -> the backbone's live tensor (parameters, tied aliases included, and
    persistent or not buffers)."""
    out: dict[str, torch.Tensor] = dict(backbone.named_buffers(remove_duplicate=False))
    out.update(backbone.named_parameters(remove_duplicate=False))
    return out


def _check_fits(spec: ExpertSpec, live: dict[str, torch.Tensor]) -> list[tuple[str, Path]]:
    """(key, file) of every checkpoint tensor, after checking each against the backbone from the
    headers alone: a misfit is refused before any weight is touched."""
    found = []
    for key, path, shape, _dtype in iter_tensor_meta(checkpoint_files(spec.path)):
        target = live.get(key)
        if target is None:
            raise MergeError(f"dense expert {spec.name!r} ({spec.path}): checkpoint tensor {key!r} does not "
                             "exist in the base model (a checkpoint of another architecture or base?)")
        if tuple(shape) != tuple(target.shape):
            raise MergeError(f"dense expert {spec.name!r} ({spec.path}): checkpoint tensor {key!r} has shape "
                             f"{list(shape)}, the base model's has {list(target.shape)}")
        found.append((key, path))
    return found


@contextmanager
def dense_expert_swapped_in(backbone: nn.Module, spec: ExpertSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block the backbone computes as ``spec``'s checkpoint; yields key -> live tensor
    for every tensor the checkpoint replaced. The base's values are restored on exit."""
    live = live_tensors(backbone)
    found = _check_fits(spec, live)
    # every base value is saved before any is overwritten: tied aliases (lm_head / embed_tokens)
    # share storage, so saving one after writing the other would save the expert's value
    saved = {key: live[key].detach().to("cpu", copy=True) for key, _ in found}
    try:
        with torch.no_grad():
            for key, path in found:
                with safe_open(str(path), framework="pt") as fh:  # reopened per tensor: one tensor's pages resident
                    live[key].copy_(fh.get_tensor(key))
        yield {key: live[key] for key, _ in found}
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                live[key].copy_(value)
