"""The result of signal collection, as the merge engine consumes it.

Kept apart from ``signals.py`` (which needs the model stack) so that the engine and the methods can
be used and tested without loading any model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Signals:
    expert_names: list[str]
    modalities: list[str]  # the modality axis T of swd
    own: list[int]  # own(e) as an index into ``modalities``
    swd: torch.Tensor  # [E, L, T] sliced Wasserstein distance per expert, layer, modality
    delta_swd: torch.Tensor  # [E, L, T] layer increments
    lam: torch.Tensor  # [E, L] layer coefficients
    # element scores S[e, k] keyed by the OUTPUT tensor key the engine merges
    # (factor mode: adapter tensor names; delta mode: module weight names)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # seeds, timings, probe hash, score kind

    @property
    def num_layers(self) -> int:
        return int(self.lam.shape[1])

    def layer_lambda(self, layer: int) -> torch.Tensor:
        return self.lam[:, layer]

    def save(self, path: Path) -> None:
        tensors = {"swd": self.swd, "delta_swd": self.delta_swd, "lam": self.lam}
        tensors.update({f"scores/{k}": v.contiguous() for k, v in self.scores.items()})
        import json

        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(path),
            metadata={
                "expert_names": json.dumps(self.expert_names),
                "modalities": json.dumps(self.modalities),
                "own": json.dumps(self.own),
                "meta": json.dumps(self.meta),
            },
        )

    @classmethod
    def load(cls, path: Path) -> "Signals":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            md = handle.metadata()
        tensors = load_file(str(path))
        scores = {k[len("scores/"):]: v for k, v in tensors.items() if k.startswith("scores/")}
        return cls(
            expert_names=json.loads(md["expert_names"]),
            modalities=json.loads(md["modalities"]),
            own=json.loads(md["own"]),
            swd=tensors["swd"],
            delta_swd=tensors["delta_swd"],
            lam=tensors["lam"],
            scores=scores,
            meta=json.loads(md["meta"]),
        )
