"""Modality encoders: raw input -> soft tokens in the backbone's embedding space.

Saved as ``config.json`` (``{"type": ..., ...}``) + ``model.safetensors``; loaded through a registry
of encoder types, never by unpickling."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from es_merging.errors import ExpertError


class SoftTokenEncoder(nn.Module):
    type_name: ClassVar[str]
    modality: ClassVar[str]

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def num_tokens(self, raw: Any) -> int:
        raise NotImplementedError

    def forward(self, raws: list[Any]) -> list[torch.Tensor]:
        """One [num_tokens(raw), hidden_size] tensor per raw input."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    # Pre-training hooks: the encoder's pooled representation [B, summary_dim] (what a classifier on
    # top would read) and its projector into the LLM's embedding space.
    summary_dim: int

    def summary_features(self, raws: list[Any]) -> torch.Tensor:
        raise NotImplementedError

    def projector(self) -> nn.Module:
        raise NotImplementedError

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"type": self.type_name, "modality": self.modality, **self.config()}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))


class FingerprintEncoder(SoftTokenEncoder):
    """Morgan fingerprint -> MLP projector -> a fixed number of soft tokens (Mol-LLaMA uses 8
    Q-Former query tokens; a fingerprint MLP is the tiny-world stand-in)."""

    type_name = "fingerprint"
    modality = "molecule"

    def __init__(self, hidden_size: int, n_tokens: int = 8, n_bits: int = 1024, radius: int = 2, width: int = 256):
        super().__init__(hidden_size)
        self.n_tokens, self.n_bits, self.radius, self.width = n_tokens, n_bits, radius, width
        self.mlp = nn.Sequential(nn.Linear(n_bits, width), nn.GELU(), nn.Linear(width, n_tokens * hidden_size))

    def num_tokens(self, raw: Any) -> int:
        return self.n_tokens

    def featurize(self, smiles: list[str]) -> torch.Tensor:
        from es_merging.modalities.molecule import morgan_fingerprints

        return torch.from_numpy(np.asarray(morgan_fingerprints(smiles, radius=self.radius, n_bits=self.n_bits),
                                           dtype=np.float32))

    def forward(self, raws: list[Any]) -> list[torch.Tensor]:
        out = self.mlp[2](self.summary_features(raws)).view(len(raws), self.n_tokens, self.hidden_size)
        return list(out.unbind(0))

    @property
    def summary_dim(self) -> int:
        return self.width

    def summary_features(self, raws: list[Any]) -> torch.Tensor:
        feats = self.featurize(list(raws)).to(self.mlp[0].weight.device)
        return self.mlp[1](self.mlp[0](feats))

    def projector(self) -> nn.Module:
        return self.mlp[2]

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "n_tokens": self.n_tokens, "n_bits": self.n_bits,
                "radius": self.radius, "width": self.width}


# ESM-2's alphabet, in its vocabulary order.
ESM_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
              "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")
_ESM_INDEX = {t: i for i, t in enumerate(ESM_TOKENS)}


class EsmProteinEncoder(SoftTokenEncoder):
    """A small ``EsmModel`` over residues + a 2-layer adapter: one soft token per residue plus the
    <cls> and <eos> positions (len + 2), as Prot2Text-V2 feeds ESM2 states to the LLM."""

    type_name = "esm"
    modality = "protein"

    def __init__(self, hidden_size: int, esm_hidden: int = 64, esm_layers: int = 2, esm_heads: int = 4,
                 max_length: int = 1024, position_embedding: str = "absolute"):
        super().__init__(hidden_size)
        from transformers import EsmConfig, EsmModel

        if position_embedding not in ("absolute", "rotary"):
            raise ValueError(f"position_embedding must be 'absolute' or 'rotary', not {position_embedding!r}")
        self.esm_hidden, self.esm_layers, self.esm_heads, self.max_length = esm_hidden, esm_layers, esm_heads, max_length
        self.position_embedding = position_embedding
        cfg = EsmConfig(vocab_size=len(ESM_TOKENS), hidden_size=esm_hidden, num_hidden_layers=esm_layers,
                        num_attention_heads=esm_heads, intermediate_size=esm_hidden * 2,
                        max_position_embeddings=max_length + 2, pad_token_id=1, mask_token_id=32,
                        position_embedding_type=position_embedding, token_dropout=False)
        self.esm = EsmModel(cfg, add_pooling_layer=False)
        self.adapter = nn.Sequential(nn.Linear(esm_hidden, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def num_tokens(self, raw: Any) -> int:
        return len(raw) + 2

    def forward(self, raws: list[Any]) -> list[torch.Tensor]:
        states, lengths = self._residue_states(raws)
        out = self.adapter(states)
        return [out[row, : n + 2] for row, n in enumerate(lengths)]

    @property
    def summary_dim(self) -> int:
        return self.esm_hidden

    def summary_features(self, raws: list[Any]) -> torch.Tensor:
        return self._residue_states(raws)[0][:, 0]  # the <cls> state

    def projector(self) -> nn.Module:
        return self.adapter

    def _residue_states(self, raws: list[Any]) -> tuple[torch.Tensor, list[int]]:
        lengths = [len(r) for r in raws]
        if max(lengths) > self.max_length:
            raise ExpertError(f"protein of length {max(lengths)} exceeds the encoder's limit {self.max_length}")
        width = max(lengths) + 2
        ids = torch.full((len(raws), width), 1, dtype=torch.long)
        for row, seq in enumerate(raws):
            ids[row, 0] = 0
            ids[row, 1:len(seq) + 1] = torch.tensor([_ESM_INDEX.get(c, 3) for c in seq])
            ids[row, len(seq) + 1] = 2
        device = self.adapter[0].weight.device
        ids = ids.to(device)
        states = self.esm(input_ids=ids, attention_mask=(ids != 1).long()).last_hidden_state
        return states, lengths

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "esm_hidden": self.esm_hidden, "esm_layers": self.esm_layers,
                "esm_heads": self.esm_heads, "max_length": self.max_length,
                "position_embedding": self.position_embedding}


ENCODER_TYPES: dict[str, type[SoftTokenEncoder]] = {
    FingerprintEncoder.type_name: FingerprintEncoder,
    EsmProteinEncoder.type_name: EsmProteinEncoder,
}


def load_encoder(path: str | Path) -> SoftTokenEncoder:
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ExpertError(f"encoder {path}: config.json is missing") from None
    except ValueError as exc:
        raise ExpertError(f"encoder {path}/config.json: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ExpertError(f"encoder {path}/config.json: expected a JSON object with a \"type\"")
    kind = cfg.pop("type", None)
    cfg.pop("modality", None)
    if kind not in ENCODER_TYPES:
        raise ExpertError(f"encoder {path}: unknown type {kind!r}; known: {sorted(ENCODER_TYPES)}")
    try:
        encoder = ENCODER_TYPES[kind](**cfg)
    except (TypeError, ValueError) as exc:
        raise ExpertError(f"encoder {path}/config.json: bad parameters ({exc})") from None
    weights = path / "model.safetensors"
    if not weights.exists():
        raise ExpertError(f"encoder {path}: model.safetensors is missing")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise ExpertError(f"encoder {weights}: not a readable safetensors file ({exc})") from None
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches raise even with strict=False
        raise ExpertError(f"encoder {path}: weights do not match its config ({exc})") from None
    if missing or unexpected:
        raise ExpertError(f"encoder {path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    encoder.eval()
    return encoder
