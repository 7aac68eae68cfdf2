"""The multimodal model: an HF causal-LM backbone (optionally with several PEFT LoRA adapters
attached, switched by name) plus modality encoders whose soft tokens replace placeholder tokens.

Base = adapters off. Every adapter sees the same input embeddings, so hidden states of the base
and of each expert are comparable token for token (what ES-Merging's signals need)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from es_merging.encoders import SoftTokenEncoder, load_encoder
from es_merging.errors import ExpertError
from es_merging.probe import PLACEHOLDERS, PromptRenderer, RenderedPrompt

log = logging.getLogger(__name__)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] right-padded
    attention_mask: torch.Tensor  # [B, S]
    masks: dict[str, torch.Tensor]  # modality -> [B, S] bool
    soft_inputs: list[dict[str, Any]]  # per row: modality -> raw input
    rendered: list[RenderedPrompt]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _load_backbone(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from es_merging.experts import checkpoint_files

    if not (path / "config.json").exists():
        raise ExpertError(f"backbone {path}: config.json is missing (expected an HF causal-LM directory)")
    checkpoint_files(path)  # safetensors present, else an error naming the pickles (never unpickled)
    # safetensors only; never trust remote code
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False)
    except (OSError, ValueError) as exc:  # unknown architecture, bad config, unreadable weights
        raise ExpertError(f"backbone {path} cannot be loaded ({exc})") from None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ExpertError(f"tokenizer in {path} cannot be loaded ({exc})") from None


class MultimodalModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, encoders: dict[str, SoftTokenEncoder] | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.encoders = nn.ModuleDict(encoders or {})
        self.renderer = PromptRenderer(tokenizer, {m: e.num_tokens for m, e in self.encoders.items()})
        self.placeholder_ids = dict(self.renderer.placeholder_ids)
        self._active: str | None = None
        # (modality, input) -> (the encoder that made it, soft tokens): an entry made by an encoder
        # that has since been replaced (model.encoders[m] = other) is not a hit
        self._soft_cache: dict[tuple[str, Any], tuple[nn.Module, torch.Tensor]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        backbone_dir: str | Path,
        *,
        adapters: dict[str, str | Path] | None = None,
        encoders: dict[str, str | Path] | None = None,
        tokenizer_dir: str | Path | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> "MultimodalModel":
        backbone_dir = Path(backbone_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        backbone = _load_backbone(backbone_dir, dtype)
        tokenizer = _load_tokenizer(Path(tokenizer_dir or backbone_dir))
        model = cls(backbone, tokenizer, {m: load_encoder(p) for m, p in (encoders or {}).items()})
        for name, path in (adapters or {}).items():
            model.add_adapter(name, path)
        model.to(device)
        model.eval()
        if adapters:
            model.set_adapter(next(iter(adapters)))
        return model

    def add_adapter(self, name: str, path: str | Path) -> None:
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_model.safetensors").exists():
            raise ExpertError(f"adapter {name!r}: {path / 'adapter_model.safetensors'} is missing")
        if name in self.adapter_names:
            raise ExpertError(f"an adapter named {name!r} is already attached; choose another name")
        # PEFT injects the LoRA layers first and loads the weights after: check the shapes before,
        # so that a misfit adapter leaves the model untouched
        self._check_adapter_fits(name, path)
        try:
            if isinstance(self.backbone, PeftModel):
                self.backbone.load_adapter(str(path), adapter_name=name)
            else:
                self.backbone = PeftModel.from_pretrained(self.backbone, str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch, unknown target modules
            if isinstance(self.backbone, PeftModel) and name in self.adapter_names:
                self.backbone.delete_adapter(name)
                self.set_adapter(self._active)
            raise ExpertError(f"adapter {name!r} at {path} does not fit this backbone: {exc}") from None
        self._active = name

    def _check_adapter_fits(self, name: str, path: Path) -> None:
        from peft import PeftModel
        from safetensors import safe_open

        root = self.backbone.base_model.model if isinstance(self.backbone, PeftModel) else self.backbone
        modules = dict(root.named_modules())
        weights = path / "adapter_model.safetensors"
        try:
            with safe_open(str(weights), framework="pt") as fh:
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise ExpertError(f"adapter {name!r}: {weights} is not a readable safetensors file ({exc})") from None
        for key, shape in shapes.items():
            parts = key.split(".")
            kind = next((k for k in ("lora_A", "lora_B") if k in parts), None)
            if kind is None:
                continue
            module_name = ".".join(parts[:parts.index(kind)]).removeprefix("base_model.model.")
            module = modules.get(module_name)
            if module is None:
                raise ExpertError(f"adapter {name!r} at {path}: {key} targets module {module_name!r}, "
                                  "which this backbone does not have (trained on another base?)")
            base = getattr(module, "base_layer", module)
            if isinstance(base, nn.Linear) and len(shape) == 2:
                got, want = (shape[1], base.in_features) if kind == "lora_A" else (shape[0], base.out_features)
                if got != want:
                    raise ExpertError(
                        f"adapter {name!r} at {path} does not fit this backbone: {key} has shape {list(shape)} but "
                        f"{module_name} maps {base.in_features} -> {base.out_features} (trained on another base?)")

    @property
    def adapter_names(self) -> list[str]:
        cfg = getattr(self.backbone, "peft_config", None)
        return list(cfg) if cfg else []

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def set_adapter(self, name: str | None) -> None:
        """Activate one adapter by name; ``None`` turns every adapter off (the base model)."""
        if name is None:
            if self.adapter_names:
                self.backbone.base_model.disable_adapter_layers()
            self._active = None
            return
        if name not in self.adapter_names:
            raise ExpertError(f"no adapter named {name!r}; attached: {self.adapter_names}")
        self.backbone.base_model.enable_adapter_layers()
        self.backbone.set_adapter(name)
        self._active = name

    @property
    def config(self):
        return self.backbone.config

    @property
    def num_layers(self) -> int:
        return int(self.backbone.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ------------------------------------------------------------------ batching
    def collate(self, rendered: Sequence[RenderedPrompt]) -> Batch:
        width = max(len(r.input_ids) for r in rendered)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rendered), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rendered), width), dtype=torch.long)
        modalities = sorted({m for r in rendered for m in r.masks})
        masks = {m: torch.zeros((len(rendered), width), dtype=torch.bool) for m in modalities}
        for row, r in enumerate(rendered):
            n = len(r.input_ids)
            ids[row, :n] = torch.tensor(r.input_ids)
            attn[row, :n] = 1
            for m, mask in r.masks.items():
                masks[m][row, :n] = torch.tensor(mask)
        return Batch(ids, attn, masks, [r.soft_inputs for r in rendered], list(rendered))

    def train(self, mode: bool = True) -> "MultimodalModel":
        self._soft_cache.clear()
        return super().train(mode)

    def clear_cache(self) -> None:
        self._soft_cache.clear()

    def _soft_tokens(self, modality: str, raws: list[Any], use_cache: bool) -> dict[Any, torch.Tensor]:
        encoder = self.encoders[modality]
        keys = [tuple(r) if isinstance(r, list) else r for r in raws]
        out: dict[Any, torch.Tensor] = {}
        todo = []
        for k, r in zip(keys, raws):
            if k in out:
                continue
            hit = self._soft_cache.get((modality, k)) if use_cache else None
            if hit is not None and hit[0] is encoder:
                out[k] = hit[1]
            else:
                out[k] = None  # type: ignore[assignment]
                todo.append((k, r))
        if todo:
            vecs = encoder([r for _, r in todo])
            for (k, _), v in zip(todo, vecs):
                out[k] = v
                if use_cache and len(self._soft_cache) < 50_000:
                    self._soft_cache[(modality, k)] = (encoder, v.detach())
        return out

    def inputs_embeds(self, batch: Batch) -> torch.Tensor:
        embed = self.backbone.get_input_embeddings()
        ids = batch.input_ids.to(self.device)
        embeds = embed(ids)
        for modality, pid in self.placeholder_ids.items():
            rows = [i for i, s in enumerate(batch.soft_inputs) if modality in s]
            if not rows:
                continue
            if modality not in self.encoders:
                raise ExpertError(f"the prompt holds raw {modality} input but no {modality} encoder is loaded")
            encoder = self.encoders[modality]
            # cache only what cannot change: an encoder in eval mode that is frozen or not under grad
            frozen = not any(p.requires_grad for p in encoder.parameters())
            use_cache = not encoder.training and (frozen or not torch.is_grad_enabled())
            soft = self._soft_tokens(modality, [batch.soft_inputs[i][modality] for i in rows], use_cache)
            # one index_put per modality, not per row: a per-row put copied the whole [B, S, H] tensor
            # B times and added B autograd nodes (~4% of an expert training step on the tiny zoo)
            hit = ids == pid
            if len(rows) != len(batch.soft_inputs):  # placeholders in other rows stay as they are (as before)
                keep = torch.zeros(len(batch.soft_inputs), dtype=torch.bool, device=hit.device)
                keep[rows] = True
                hit &= keep[:, None]
            row_idx, pos_idx = hit.nonzero(as_tuple=True)
            counts = torch.bincount(row_idx, minlength=len(batch.soft_inputs)).tolist()
            vecs = []
            for i in rows:
                raw = batch.soft_inputs[i][modality]
                vec = soft[tuple(raw) if isinstance(raw, list) else raw]
                if counts[i] != len(vec):
                    raise ExpertError(f"row {i}: {counts[i]} {PLACEHOLDERS[modality]} tokens but {len(vec)} soft tokens")
                vecs.append(vec)
            # nonzero() lists positions row by row, in order: the same order as the concatenated rows
            embeds = embeds.index_put((row_idx, pos_idx), torch.cat(vecs).to(embeds.dtype))
        return embeds

    def forward(self, batch: Batch, *, output_hidden_states: bool = False):
        return self.backbone(
            inputs_embeds=self.inputs_embeds(batch),
            attention_mask=batch.attention_mask.to(self.device),
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )

    def hidden_states(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Layer outputs: index 0 = embeddings, index l = output of decoder layer l."""
        return self.forward(batch, output_hidden_states=True).hidden_states
