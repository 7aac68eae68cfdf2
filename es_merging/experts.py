"""Expert specs: what an expert directory holds, how it is recognised, and compatibility checks.

An expert directory (PEFT layout plus one manifest):
    expert.json                  {"format", "name", "modality", "kind", "base_hash", "encoder", ...}
    adapter_config.json          } kind == "lora"
    adapter_model.safetensors    }
    config.json + model*.safetensors   kind == "dense" (a full checkpoint on the same base)
    encoder/config.json + encoder/model.safetensors   optional modality encoder (soft tokens)

A plain HF checkpoint or PEFT adapter directory without ``expert.json`` is accepted too (as a user
merging ordinary fine-tunes expects): its modality is then unknown, which only ES needs.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from es_merging.errors import ExpertError

EXPERT_FORMAT = "es-merging-expert/1"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ExpertSpec:
    path: Path
    name: str
    kind: str  # "lora" | "dense"
    modality: str | None
    base_hash: str | None
    encoder_dir: Path | None
    adapter_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_scaling(self) -> float:
        """PEFT's scaling alpha / r (alpha / sqrt(r) with rsLoRA)."""
        cfg = self.adapter_config
        r = int(cfg.get("r", 0)) or 1
        alpha = float(cfg.get("lora_alpha", r))
        if cfg.get("use_rslora"):
            return alpha / (r ** 0.5)
        return alpha / r

    @property
    def rank(self) -> int | None:
        return int(self.adapter_config["r"]) if self.kind == "lora" else None

    def weight_files(self) -> list[Path]:
        if self.kind == "lora":
            return [self.path / ADAPTER_WEIGHTS]
        return checkpoint_files(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.name,
            "kind": self.kind,
            "modality": self.modality,
            "base_hash": self.base_hash,
            "encoder": str(self.encoder_dir) if self.encoder_dir else None,
            "rank": self.rank,
        }


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint directory (sharded or not). Refuses pickles."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ExpertError(f"{index}: unreadable shard index ({exc}); re-save the checkpoint") from None
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        # an unsharded HF checkpoint is model.safetensors alone (as transformers loads it); other
        # safetensors beside it (a merged model's coefficients.safetensors, an adapter) are not weights
        if (model_dir / "model.safetensors") in files:
            files = [model_dir / "model.safetensors"]
        files = [f for f in files if f.name not in (ADAPTER_WEIGHTS, "coefficients.safetensors")]
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        if pickles:
            raise ExpertError(
                f"{model_dir}: only pickle weights ({', '.join(pickles)}) found; es-merging loads safetensors only. "
                "Convert with `model.save_pretrained(dir, safe_serialization=True)` in a trusted environment"
            )
        raise ExpertError(f"{model_dir}: no *.safetensors weights found")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ExpertError(f"{model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def iter_tensor_meta(files: list[Path]) -> Iterator[tuple[str, Path, tuple[int, ...], str]]:
    """(name, file, shape, dtype) for every tensor, reading headers only."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    yield key, f, tuple(sl.get_shape()), str(sl.get_dtype())
        except Exception as exc:  # safetensors raises its own error types
            if isinstance(exc, ExpertError):
                raise
            raise ExpertError(f"{f}: not a readable safetensors file ({exc})") from None


_HASH_CACHE: dict[tuple[str, float, int], str] = {}
_HASH_LOCK = threading.Lock()


def base_hash(model_dir: str | Path) -> str:
    """Content hash of a checkpoint's weights (names, dtypes, shapes and bytes, sorted by name).

    Independent of sharding and file names, so re-saving the same weights keeps the hash.
    Cached per (file, mtime, size) because it reads every byte."""
    files = checkpoint_files(Path(model_dir))
    stats = [(f, f.stat()) for f in files]
    # nanosecond mtime and inode too: a re-save of same-sized weights must never hit a stale entry
    stamp = tuple((str(f.resolve()), st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size) for f, st in stats)
    key = (repr(stamp), 0.0, 0)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    entries = sorted(iter_tensor_meta(files))
    digest = hashlib.sha256()
    for name, f, shape, dtype in entries:
        with safe_open(str(f), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        digest.update(f"{name}|{dtype}|{shape}".encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    value = "sha256:" + digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = value
    return value


def load_expert_spec(path: str | Path) -> ExpertSpec:
    """Recognise an expert directory; every missing piece is an error that names it."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ExpertError(f"expert {path}: not a directory")
    manifest_file = path / "expert.json"
    meta: dict[str, Any] = {}
    if manifest_file.exists():
        try:
            meta = json.loads(manifest_file.read_text())
        except ValueError as exc:
            raise ExpertError(f"{manifest_file}: invalid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != EXPERT_FORMAT:
            raise ExpertError(f"{manifest_file}: expected \"format\": \"{EXPERT_FORMAT}\"")
        for key in ("name", "modality", "kind", "base_hash", "encoder"):
            if meta.get(key) is not None and not (isinstance(meta[key], str) and meta[key].strip()):
                raise ExpertError(f"{manifest_file}: {key!r} must be a non-empty string or null, not {meta[key]!r}")
    has_adapter = (path / ADAPTER_CONFIG).exists()
    kind = meta.get("kind") or ("lora" if has_adapter else "dense")
    if kind not in ("lora", "dense"):
        raise ExpertError(f"{manifest_file}: kind must be 'lora' or 'dense', not {kind!r}")
    adapter_config: dict[str, Any] = {}
    if kind == "lora":
        if not has_adapter:
            raise ExpertError(f"expert {path}: missing {ADAPTER_CONFIG} (a LoRA expert needs a PEFT adapter)")
        if not (path / ADAPTER_WEIGHTS).exists():
            bins = list(path.glob("adapter_model.bin"))
            hint = " (only a pickle adapter_model.bin: re-save with safe_serialization=True)" if bins else ""
            raise ExpertError(f"expert {path}: missing {ADAPTER_WEIGHTS}{hint}")
        try:
            adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
        except ValueError as exc:
            raise ExpertError(f"{path / ADAPTER_CONFIG}: invalid JSON ({exc})") from None
        if adapter_config.get("peft_type", "LORA") != "LORA":
            raise ExpertError(f"expert {path}: peft_type {adapter_config.get('peft_type')!r} is not LORA")
        if "r" not in adapter_config:
            raise ExpertError(f"{path / ADAPTER_CONFIG}: no LoRA rank 'r'")
    else:
        if not (path / "config.json").exists():
            raise ExpertError(f"expert {path}: neither {ADAPTER_CONFIG} nor config.json found")
        checkpoint_files(path)
    encoder_dir = None
    if meta.get("encoder"):
        encoder_dir = (path / meta["encoder"]).resolve()
        if not encoder_dir.is_relative_to(path):
            raise ExpertError(f"{manifest_file}: encoder path {meta['encoder']!r} leaves the expert directory")
        for needed in ("config.json", "model.safetensors"):
            if not (encoder_dir / needed).exists():
                raise ExpertError(f"expert {path}: encoder file {encoder_dir / needed} is missing")
    return ExpertSpec(
        path=path,
        name=str(meta.get("name") or path.name),
        kind=kind,
        modality=meta.get("modality"),
        base_hash=meta.get("base_hash"),
        encoder_dir=encoder_dir,
        adapter_config=adapter_config,
        meta=meta,
    )


def check_compatible(base_dir: str | Path, experts: list[ExpertSpec], *, require_modality: bool = False) -> str:
    """Refuse experts declared on another base. Returns the base hash."""
    if len(experts) < 2:
        raise ExpertError(f"a merge needs at least 2 experts, got {len(experts)}")
    names = [e.name for e in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExpertError(f"expert names must be unique; repeated: {dupes}")
    digest = base_hash(base_dir)
    for e in experts:
        if e.base_hash and e.base_hash != digest:
            raise ExpertError(
                f"expert {e.name!r} ({e.path}) was trained on base {e.base_hash[:19]}..., "
                f"but the base given is {digest[:19]}...; pass the base it was trained on"
            )
        if require_modality and not e.modality:
            raise ExpertError(
                f"expert {e.name!r} ({e.path}) declares no modality; ES-Merging needs one "
                "(add \"modality\" to its expert.json)"
            )
    return digest
