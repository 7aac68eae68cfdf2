"""Streaming merge engine (DESIGN section 4): plan the output tensors from safetensors headers, then
merge them one at a time.

Why it reads and writes safetensors itself instead of ``safe_open`` / ``save_file``:
- ``safe_open`` hands out tensors backed by a private mmap of the whole file; every page touched
  stays resident until the handle closes, so with handles kept open the resident set grows with
  the model. ``os.preadv`` into reusable work buffers copies once (about twice as fast here) and
  keeps nothing of the file resident.
- ``save_file`` needs a whole shard in memory. Every output shape and dtype is known at planning
  time, so each shard's header is computed up front and tensors go to disk as they are merged: the
  shard size then sets file sizes only, never memory.
Peak memory is therefore the expert stack (E x the largest tensor, reused from tensor to tensor),
the method's result, an 8 MiB chunk through which the base streams, and a fixed overhead: (E + 1)
x the largest tensor whatever the model or shard size, plus what the method itself allocates
(peft's TIES: about 16 tensors' worth of temporaries on a 3-expert stack). Methods may
modify the ``deltas`` they are given in place (the engine does not read them afterwards) and the
engine may modify the tensor a method returns (it adds the base into it).

Files are standard safetensors (checked by the tests with ``safetensors.safe_open``/``load_file``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from es_merging.errors import ExpertError, MergeError
from es_merging.experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExpertSpec, checkpoint_files
from es_merging.methods.base import MergeMethod, TensorContext
from es_merging.staging import staged_directory

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
DEFAULT_SHARD_MB = 512  # file size only: the streaming writer buffers nothing
ELEMENT_COEFFICIENTS_LIMIT_MB = 1024  # above this the per-element coefficients are not kept on disk
PEFT_PREFIX = "base_model.model."


class MergeCancelled(MergeError):
    """The merge was cancelled between two tensors; nothing was left on disk."""


# ============================================================== safetensors I/O (streaming)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise MergeError(f"safetensors dtype {name!r} is not supported") from None


def _itemsize(name: str) -> int:
    return torch.empty((), dtype=torch_dtype(name)).element_size()


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _itemsize(dtype)


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (no tensor data is read); malformed files are ExpertErrors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} is impossible for a {size}-byte file")
            header = json.loads(fh.read(n))
        start = 8 + n
        entries: dict[str, TensorEntry] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
            if dtype not in _DTYPES:
                raise ValueError(f"tensor {key!r} has unsupported dtype {dtype!r}")
            if not (0 <= b <= e and start + e <= size) or e - b != _nbytes(shape, dtype):
                raise ValueError(f"tensor {key!r} has inconsistent offsets {b}..{e}")
            entries[key] = TensorEntry(dtype, shape, start + b, start + e)
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExpertError(f"{path}: not a readable safetensors file ({exc})") from None


class TensorFile:
    """One safetensors file opened for positioned reads into caller-owned buffers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = read_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        entry = self.entries[key]
        if out.dtype != torch_dtype(entry.dtype) or tuple(out.shape) != entry.shape or not out.is_contiguous():
            raise MergeError(f"{self.path}: buffer for {key!r} does not match {entry.dtype}{list(entry.shape)}")
        view, pos = _byte_view(out), entry.begin
        while view.nbytes:
            got = os.preadv(self._fd, [view], pos)
            if got <= 0:
                raise ExpertError(f"{self.path}: file ended while reading tensor {key!r}")
            view, pos = view[got:], pos + got

    def read_range(self, key: str, start: int, out: torch.Tensor) -> None:
        """Read ``out.numel()`` elements of ``key`` from element ``start`` on into flat ``out``."""
        entry = self.entries[key]
        item = out.element_size()
        view, pos = _byte_view(out), entry.begin + start * item
        if out.dtype != torch_dtype(entry.dtype) or pos + view.nbytes > entry.end:
            raise MergeError(f"{self.path}: range {start}+{out.numel()} of {key!r} is out of bounds")
        while view.nbytes:
            got = os.preadv(self._fd, [view], pos)
            if got <= 0:
                raise ExpertError(f"{self.path}: file ended while reading tensor {key!r}")
            view, pos = view[got:], pos + got

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        if out.numel():
            self.read_into(key, out)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class OutSpec:
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


class ShardWriter:
    """Writes safetensors shards whose headers are computed up front from the planned outputs, so
    each tensor goes straight to disk (nothing is buffered). Tensors must arrive in plan order."""

    def __init__(self, directory: Path, outputs: list[OutSpec], *, max_shard_bytes: int | None,
                 single_name: str, shard_stem: str = "model", metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[OutSpec]] = [[]]
        size = 0
        for spec in outputs:
            if max_shard_bytes is not None and shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        self.shards = shards
        n = len(shards)
        self.names = [single_name] if n == 1 else [f"{shard_stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._keys = {spec.key for _, spec in self._order}
        self._next = 0
        self._fh = None
        self.bytes_written = 0

    def planned(self, key: str) -> bool:
        return key in self._keys

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def _open(self, index: int) -> None:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for spec in self.shards[index]:
            header[spec.key] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors itself writes
        self._fh = open(self.directory / self.names[index], "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise MergeError(f"internal: tensor {key!r} was not planned")
        index, spec = self._order[self._next]
        if key != spec.key or tuple(tensor.shape) != spec.shape or _DTYPE_NAMES.get(tensor.dtype) != spec.dtype:
            raise MergeError(
                f"internal: expected {spec.key!r} {spec.dtype}{list(spec.shape)}, got {key!r} "
                f"{_DTYPE_NAMES.get(tensor.dtype)}{list(tensor.shape)}"
            )
        if self._fh is None:
            self._open(index)
        if tensor.numel():
            self._fh.write(_byte_view(tensor.contiguous()))
        self.bytes_written += spec.nbytes
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != index:
            self._fh.close()
            self._fh = None

    def finish(self, index_name: str = "model.safetensors.index.json") -> list[str]:
        if self._next != len(self._order):
            raise MergeError(f"internal: {len(self._order) - self._next} planned tensors were never written")
        if not self._order:  # no tensors at all: still a valid (empty) file
            self._open(0)
            self._fh.close()
            self._fh = None
        files = list(self.names)
        if self.sharded:
            index = {
                "metadata": {"total_size": sum(s.nbytes for _, s in self._order)},
                "weight_map": {s.key: self.names[i] for i, s in self._order},
            }
            (self.directory / index_name).write_text(json.dumps(index, indent=2))
            files.append(index_name)
        return files

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ============================================================== naming
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_LORA_EMB_RE = re.compile(r"^(?P<module>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)$")


def layer_index(key: str) -> int | None:
    """Decoder layer of a tensor from its key (``.layers.<n>.``), None outside the layers."""
    m = _LAYER_RE.search(key)
    return int(m.group(1)) if m else None


def natural_key(key: str) -> tuple:
    """Sort key ordering layer 2 before layer 10 (shards then group whole layers)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", key)))


def tensor_seed(seed: int, key: str) -> int:
    """Per-tensor seed from the global seed and the key: results do not depend on visiting order."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _parse_lora_key(key: str) -> tuple[str, str] | None:
    m = _LORA_RE.match(key) or _LORA_EMB_RE.match(key)
    return (m.group("module"), m.group("which")) if m else None


# ============================================================== plan
@dataclass(frozen=True)
class Source:
    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    """One merged tensor. kind:
    factor       deltas[e] = scale_e * T_e (T = LoRA A or B; scale 1 for A)         -> merged
    lora_delta   deltas[e] = scale_e * (B_e @ A_e) (transposed for embeddings)       -> base + merged, or SVD factors
    dense_delta  deltas[e] = W_e - W_base                                            -> base + merged
    copy         the base tensor unchanged (not adapted by any expert)"""

    key: str  # merged tensor key: seeds, element scores and the report use it
    layer: int | None
    kind: str
    shape: tuple[int, ...]  # merged delta shape
    experts: tuple[tuple[Source, ...], ...] = ()  # per expert: (T,) or (A, B) or (W,)
    scales: tuple[float, ...] = ()
    transpose: bool = False
    base: Source | None = None
    outputs: tuple[OutSpec, ...] = ()
    work_dtype: str = "F32"


@dataclass
class MergePlan:
    base_dir: Path
    expert_names: list[str]
    expert_kind: str  # "lora" | "dense"
    mode: str  # "factor" | "delta"
    rank: int | None
    output_format: str  # "adapter" | "dense"
    tasks: list[Task]
    num_layers: int | None
    adapter_config: dict[str, Any] | None = None

    @property
    def outputs(self) -> list[OutSpec]:
        return [o for t in self.tasks for o in t.outputs]

    @property
    def largest_tensor_bytes(self) -> int:
        sizes = [_nbytes(t.shape, t.work_dtype) for t in self.tasks] + [o.nbytes for o in self.outputs]
        return max(sizes, default=0)

    @property
    def bytes_to_read(self) -> int:
        total = 0
        for t in self.tasks:
            for s in [src for srcs in t.experts for src in srcs] + ([t.base] if t.base else []):
                total += _nbytes(s.shape, s.dtype)
        return total

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "expert_kind": self.expert_kind, "rank": self.rank,
            "output_format": self.output_format, "num_tensors": len(self.tasks),
            "num_outputs": len(self.outputs), "num_layers": self.num_layers,
            "bytes_to_read": self.bytes_to_read, "largest_tensor_bytes": self.largest_tensor_bytes,
        }


def _header_sources(files: list[Path], owner: str) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for f in files:
        for key, entry in read_header(f).items():
            if key in out:
                raise MergeError(f"{owner}: tensor {key!r} appears in both {out[key].file.name} and {f.name}")
            out[key] = Source(f, key, entry.dtype, entry.shape)
    return out


def _num_layers(base_dir: Path, keys) -> int | None:
    cfg = base_dir / "config.json"
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text())
            n = data.get("num_hidden_layers") or (data.get("text_config") or {}).get("num_hidden_layers")
            if n:
                return int(n)
        except ValueError:
            raise ExpertError(f"{cfg}: invalid JSON") from None
    layers = [layer_index(k) for k in keys]
    layers = [x for x in layers if x is not None]
    return max(layers) + 1 if layers else None


def _work_dtype(sources: list[Source]) -> str:
    return "F64" if any(s.dtype == "F64" for s in sources) else "F32"


def _who(e: ExpertSpec) -> str:
    return f"expert {e.name!r} ({e.path})"


def _check_same_keys(ref_name: str, ref: set[str], name: str, keys: set[str], what: str) -> None:
    missing, extra = sorted(ref - keys, key=natural_key), sorted(keys - ref, key=natural_key)
    if missing:
        raise MergeError(f"{name} lacks {what} {missing[0]!r} that {ref_name} has"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise MergeError(f"{name} has {what} {extra[0]!r} that {ref_name} lacks"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _lora_modules(expert: ExpertSpec) -> dict[str, dict[str, Source]]:
    """module -> {"A": Source, "B": Source, "embedding": bool} of one LoRA adapter file."""
    cfg = expert.adapter_config
    if cfg.get("use_dora"):
        raise MergeError(f"{_who(expert)}: DoRA adapters are not supported (use_dora=true)")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pattern):
            raise MergeError(f"{_who(expert)}: per-module {pattern} is not supported; re-save the adapter with one rank and alpha")
    sources = _header_sources([expert.path / ADAPTER_WEIGHTS], f"{_who(expert)}")
    modules: dict[str, dict[str, Any]] = {}
    for key, src in sources.items():
        parsed = _parse_lora_key(key)
        if parsed is None:
            raise MergeError(
                f"{_who(expert)}: adapter tensor {key!r} is not a LoRA A/B matrix "
                "(modules_to_save, LoRA biases and DoRA magnitudes cannot be merged here)"
            )
        module, which = parsed
        slot = modules.setdefault(module, {"embedding": which.startswith("lora_embedding")})
        slot["A" if which.endswith("A") else "B"] = src
    for module, slot in modules.items():
        if "A" not in slot or "B" not in slot:
            raise MergeError(f"{_who(expert)}: module {module!r} has only one of its LoRA A/B matrices")
    return modules


def plan_merge(base_dir: str | Path, experts: list[ExpertSpec], *, mode: str | None = None,
               rank: int | None = None) -> MergePlan:
    """Plan every output tensor from the safetensors headers (no tensor data is read)."""
    base_dir = Path(base_dir)
    if len(experts) < 2:
        raise MergeError(f"a merge needs at least 2 experts, got {len(experts)}")
    kinds = {e.kind for e in experts}
    if len(kinds) > 1:
        lora = [e.name for e in experts if e.kind == "lora"]
        dense = [e.name for e in experts if e.kind == "dense"]
        raise MergeError(f"cannot merge LoRA experts {lora} with dense experts {dense} in one merge")
    kind = kinds.pop()
    mode = mode or ("factor" if kind == "lora" else "delta")
    if mode not in ("factor", "delta"):
        raise MergeError(f"mode {mode!r}: choose 'factor' or 'delta'")
    if kind == "dense" and mode == "factor":
        raise MergeError("dense (full-checkpoint) experts can only be merged in delta mode (--mode delta)")
    if rank is not None and not (kind == "lora" and mode == "delta"):
        raise MergeError("--rank re-factors a delta-mode merge of LoRA experts; it does not apply to "
                         f"{kind} experts in {mode} mode")
    base_sources = _header_sources(checkpoint_files(base_dir), f"base {base_dir}")
    names = [e.name for e in experts]
    num_layers = _num_layers(base_dir, base_sources)
    if kind == "dense":
        tasks = _plan_dense(base_sources, experts)
        return MergePlan(base_dir, names, kind, mode, None, "dense", tasks, num_layers)
    modules = [_lora_modules(e) for e in experts]
    ref = set(modules[0])
    for e, mods in zip(experts[1:], modules[1:]):
        _check_same_keys(_who(experts[0]), ref, _who(e), set(mods), "LoRA module")
    if mode == "factor":
        tasks = _plan_factor(experts, modules)
        return MergePlan(base_dir, names, kind, mode, None, "adapter", tasks, num_layers,
                         adapter_config=_adapter_config(experts[0], int(experts[0].adapter_config["r"])))
    tasks = _plan_lora_delta(base_sources, experts, modules, rank)
    if rank is None:
        return MergePlan(base_dir, names, kind, mode, None, "dense", tasks, num_layers)
    return MergePlan(base_dir, names, kind, mode, rank, "adapter", tasks, num_layers,
                     adapter_config=_adapter_config(experts[0], rank))


def _adapter_config(template: ExpertSpec, r: int) -> dict[str, Any]:
    """The merged adapter's config: the LoRA scaling is folded into B, so lora_alpha == r."""
    cfg = dict(template.adapter_config)
    cfg.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={}, use_dora=False)
    cfg.pop("auto_mapping", None)
    return cfg


def _sorted_tasks(tasks: list[Task]) -> list[Task]:
    # larger items first keeps every tensor aligned in the shards (as safetensors' own writer does)
    return sorted(tasks, key=lambda t: (-_itemsize(t.outputs[0].dtype), natural_key(t.key)))


def _plan_factor(experts: list[ExpertSpec], modules: list[dict[str, dict[str, Any]]]) -> list[Task]:
    ranks = [e.rank for e in experts]
    if len(set(ranks)) > 1:
        odd = next(e for e in experts if e.rank != ranks[0])
        raise MergeError(
            f"factor mode needs equal LoRA ranks: expert {odd.name!r} has rank {odd.rank}, "
            f"expert {experts[0].name!r} has rank {ranks[0]}; use --mode delta (optionally --rank R)"
        )
    tasks = []
    for module in modules[0]:
        for which in ("A", "B"):
            srcs = [mods[module][which] for mods in modules]
            for e, s in zip(experts, srcs):
                if s.shape != srcs[0].shape:
                    raise MergeError(f"{_who(e)}: tensor {s.key!r} has shape {list(s.shape)}, "
                                     f"expert {experts[0].name!r} has {list(srcs[0].shape)}")
            dtypes = {s.dtype for s in srcs}
            out_dtype = srcs[0].dtype if len(dtypes) == 1 else "F32"
            key = srcs[0].key
            scales = tuple(e.lora_scaling if which == "B" else 1.0 for e in experts)
            tasks.append(Task(key, layer_index(key), "factor", srcs[0].shape,
                              experts=tuple((s,) for s in srcs), scales=scales,
                              outputs=(OutSpec(key, srcs[0].shape, out_dtype),), work_dtype=_work_dtype(srcs)))
    return _sorted_tasks(tasks)


def _plan_lora_delta(base: dict[str, Source], experts: list[ExpertSpec],
                     modules: list[dict[str, dict[str, Any]]], rank: int | None) -> list[Task]:
    tasks, adapted = [], set()
    for module in modules[0]:
        if not module.startswith(PEFT_PREFIX):
            raise MergeError(f"expert {experts[0].name!r}: LoRA module {module!r} lacks PEFT's {PEFT_PREFIX!r} prefix")
        base_key = module[len(PEFT_PREFIX):] + ".weight"
        if base_key not in base:
            raise MergeError(f"expert {experts[0].name!r}: LoRA module {module!r} adapts {base_key!r}, which the base lacks")
        bsrc = base[base_key]
        embedding = modules[0][module]["embedding"]
        per_expert = []
        for e, mods in zip(experts, modules):
            a, b = mods[module]["A"], mods[module]["B"]
            transpose = embedding or bool(e.adapter_config.get("fan_in_fan_out"))
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise MergeError(f"{_who(e)}: LoRA {a.key!r} {list(a.shape)} and {b.key!r} {list(b.shape)} do not multiply")
            dw = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            if dw != bsrc.shape:
                raise MergeError(f"{_who(e)}: LoRA update of {module!r} has shape {list(dw)}, "
                                 f"the base tensor {base_key!r} has {list(bsrc.shape)}")
            if transpose != (embedding or bool(experts[0].adapter_config.get("fan_in_fan_out"))):
                raise MergeError(f"{_who(e)}: fan_in_fan_out differs from expert {experts[0].name!r}")
            per_expert.append((a, b))
        transpose = embedding or bool(experts[0].adapter_config.get("fan_in_fan_out"))
        srcs = [s for pair in per_expert for s in pair] + [bsrc]
        if rank is None:
            outputs = (OutSpec(base_key, bsrc.shape, bsrc.dtype),)
        else:
            if transpose:
                raise MergeError(f"--rank: re-factoring {module!r} (an embedding or fan_in_fan_out module) is not supported")
            out_dim, in_dim = bsrc.shape
            if rank > min(out_dim, in_dim):
                raise MergeError(f"--rank {rank} exceeds min(out, in) = {min(out_dim, in_dim)} of {base_key!r}")
            adt = per_expert[0][0].dtype
            outputs = (OutSpec(f"{module}.lora_A.weight", (rank, in_dim), adt),
                       OutSpec(f"{module}.lora_B.weight", (out_dim, rank), adt))
        adapted.add(base_key)
        tasks.append(Task(base_key, layer_index(base_key), "lora_delta", bsrc.shape,
                          experts=tuple(per_expert), scales=tuple(e.lora_scaling for e in experts),
                          transpose=transpose, base=bsrc if rank is None else None,
                          outputs=outputs, work_dtype=_work_dtype(srcs)))
    if rank is None:  # a full checkpoint: every other base tensor is copied
        for key, src in base.items():
            if key not in adapted:
                tasks.append(Task(key, layer_index(key), "copy", src.shape, base=src,
                                  outputs=(OutSpec(key, src.shape, src.dtype),), work_dtype=src.dtype))
    return _sorted_tasks(tasks)


def _plan_dense(base: dict[str, Source], experts: list[ExpertSpec]) -> list[Task]:
    per_expert = []
    for e in experts:
        srcs = _header_sources(checkpoint_files(e.path), f"{_who(e)}")
        _check_same_keys("the base", set(base), _who(e), set(srcs), "tensor")
        for key, s in srcs.items():
            if s.shape != base[key].shape:
                raise MergeError(f"{_who(e)}: tensor {key!r} has shape {list(s.shape)}, the base has {list(base[key].shape)}")
        per_expert.append(srcs)
    tasks = []
    for key, bsrc in base.items():
        srcs = [p[key] for p in per_expert]
        floating = torch_dtype(bsrc.dtype).is_floating_point and all(torch_dtype(s.dtype).is_floating_point for s in srcs)
        tasks.append(Task(key, layer_index(key), "dense_delta" if floating else "copy_equal", bsrc.shape,
                          experts=tuple((s,) for s in srcs), scales=tuple(1.0 for _ in srcs), base=bsrc,
                          outputs=(OutSpec(key, bsrc.shape, bsrc.dtype),),
                          work_dtype=_work_dtype(srcs + [bsrc]) if floating else bsrc.dtype))
    return _sorted_tasks(tasks)


# ============================================================== execution
def svd_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: delta ~ B @ A with B = U_r * S_r [out, r] and A = Vh_r [r, in] (lora_alpha == r)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()


CHUNK_BYTES = 8 * 2**20  # the base and dtype conversions stream through a scratch this size


class _Workspace:
    """Flat buffers reused across tensors (no allocation and page-faulting per tensor): the expert
    stack, which grows to E x the largest tensor, and a small chunk scratch."""

    def __init__(self):
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            self._bufs.pop((name, dtype), None)  # free before allocating the larger one
            buf = torch.empty(max(n, 1), dtype=dtype)
            self._bufs[(name, dtype)] = buf
        return buf[:n].view(shape)


@dataclass
class EngineResult:
    files: list[str]  # written weight files (relative to the output directory)
    tensor_stats: list[dict[str, Any]]
    expert_hashes: list[str]  # "sha256-tensors:<hex>" of every tensor each expert file holds
    bytes_read: int
    bytes_written: int
    seconds: float
    coefficients: dict[str, Any] = field(default_factory=dict)  # what coefficients.safetensors holds
    rules: dict[str, int] = field(default_factory=dict)  # method rules applied (e.g. non_layer_average)


class _Hashes:
    """Per-expert content hash built from per-tensor digests, so it needs no extra read."""

    def __init__(self, n: int):
        self.lines: list[dict[str, str]] = [{} for _ in range(n)]

    def add(self, e: int, src: Source, data: torch.Tensor) -> None:
        digest = hashlib.sha256(_byte_view(data) if data.numel() else b"").hexdigest()
        self.lines[e][src.key] = f"{src.key}|{src.dtype}|{list(src.shape)}|{digest}"

    def result(self) -> list[str]:
        return ["sha256-tensors:" + hashlib.sha256("\n".join(v for _, v in sorted(d.items())).encode()).hexdigest()
                for d in self.lines]


class _Executor:
    def __init__(self, plan: MergePlan, method: MergeMethod, *, seed: int, signals):
        self.plan, self.method, self.seed, self.signals = plan, method, seed, signals
        self.ws = _Workspace()
        self.files: dict[Path, TensorFile] = {}
        self.hashes = _Hashes(len(plan.expert_names))
        self.bytes_read = 0
        self.rules: dict[str, int] = {}

    def _file(self, path: Path) -> TensorFile:
        if path not in self.files:
            self.files[path] = TensorFile(path)
        return self.files[path]

    def _entry(self, src: Source) -> TensorFile:
        f = self._file(src.file)
        entry = f.entries.get(src.key)
        if entry is None or entry.dtype != src.dtype or entry.shape != src.shape:
            raise ExpertError(f"{src.file}: tensor {src.key!r} changed since the merge was planned")
        self.bytes_read += _nbytes(src.shape, src.dtype)
        return f

    def read(self, src: Source) -> torch.Tensor:
        """``src`` in its own dtype, in a fresh tensor (small tensors: LoRA factors, copies)."""
        f = self._entry(src)
        out = torch.empty(src.shape, dtype=torch_dtype(src.dtype))
        if out.numel():
            f.read_into(src.key, out)
        return out

    def chunks(self, src: Source, wd: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, flat chunk in ``wd``) over ``src``, through the small scratch: a full-size copy of
        the base is never held, which keeps the peak at the expert stack plus the method's result."""
        f = self._entry(src)
        native = torch_dtype(src.dtype)
        numel = math.prod(src.shape)
        step = max(1, CHUNK_BYTES // torch.empty((), dtype=native).element_size())
        scratch = self.ws.get("chunk", (min(step, numel),), native)
        for start in range(0, numel, step):
            raw = scratch[: min(step, numel - start)]
            f.read_range(src.key, start, raw)
            yield start, raw.to(wd)

    def read_into(self, src: Source, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (same dtype as the file's) with ``src`` and return it."""
        f = self._entry(src)
        if out.numel():
            f.read_into(src.key, out)
        return out

    def deltas(self, task: Task) -> torch.Tensor:
        wd = torch_dtype(task.work_dtype)
        stack = self.ws.get("stack", (len(task.experts), *task.shape), wd)
        for e, srcs in enumerate(task.experts):
            if task.kind == "lora_delta":
                a_src, b_src = srcs
                a, b = self.read(a_src), self.read(b_src)
                self.hashes.add(e, a_src, a)
                self.hashes.add(e, b_src, b)
                a, b = a.to(wd), b.to(wd)
                if task.transpose:
                    stack[e].copy_((b @ a).T)
                else:
                    torch.matmul(b, a, out=stack[e])
                stack[e].mul_(task.scales[e])
            else:
                src = srcs[0]
                if torch_dtype(src.dtype) == wd:
                    self.hashes.add(e, src, self.read_into(src, stack[e]))
                else:  # hash the file's own bytes, then convert
                    raw = self.read(src)
                    self.hashes.add(e, src, raw)
                    stack[e].copy_(raw)
                    del raw
                if task.kind == "factor" and task.scales[e] != 1.0:
                    stack[e].mul_(task.scales[e])
        if task.kind == "dense_delta":  # W_e - W_base, one pass over the base for all experts
            flat = stack.view(stack.shape[0], -1)
            for start, chunk in self.chunks(task.base, wd):
                flat[:, start:start + chunk.numel()].sub_(chunk)
        return stack

    def context(self, task: Task) -> TensorContext:
        s = tensor_seed(self.seed, task.key)
        ctx = TensorContext(key=task.key, layer=task.layer, generator=torch.Generator().manual_seed(s), seed=s)
        return _attach_signals(ctx, task, self.method, self.signals, len(self.plan.expert_names))

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _attach_signals(ctx: TensorContext, task: Task, method: MergeMethod, signals, n_exp: int) -> TensorContext:
    if signals is None or task.layer is None:
        return ctx
    if getattr(method, "needs_layer_coefficients", False):
        lam = signals.lam
        if lam.dim() != 2 or lam.shape[0] != n_exp or task.layer >= lam.shape[1]:
            raise MergeError(f"tensor {task.key!r} is in layer {task.layer}, but the signals' layer "
                             f"coefficients have shape {list(lam.shape)} for {n_exp} experts")
        ctx.layer_lambda = lam[:, task.layer]
    if getattr(method, "needs_element_scores", False):
        scores = signals.scores.get(task.key)
        if scores is None:
            raise MergeError(f"the signals have no element scores for tensor {task.key!r} "
                             "(recompute the signals in the same mode as the merge)")
        ctx.element_scores = scores
    return ctx


def _check_method_inputs(plan: MergePlan, method: MergeMethod, signals) -> None:
    needs = getattr(method, "needs_layer_coefficients", False) or getattr(method, "needs_element_scores", False)
    if needs and signals is None:
        raise MergeError(f"method {method.name!r} needs signals from a probe; none were given")
    if signals is not None and list(signals.expert_names) != list(plan.expert_names):
        raise MergeError(f"signals are for experts {signals.expert_names}, the merge has {plan.expert_names}")


def _stats(task: Task, expert_norms: torch.Tensor, merged: torch.Tensor, extras: dict) -> dict[str, Any]:
    flat = merged.reshape(-1)
    n = max(flat.numel(), 1)
    return {
        "key": task.key, "layer": task.layer, "shape": list(task.shape), "kind": task.kind,
        "expert_delta_norms": [round(float(x), 6) for x in expert_norms],
        "merged_norm": round(float(torch.linalg.vector_norm(flat)), 6),
        "merged_abs_mean": float(torch.linalg.vector_norm(flat, ord=1)) / n,
        "nonzero_fraction": float(torch.count_nonzero(flat)) / n,
        **({"rule": extras["rule"]} if "rule" in extras else {}),
    }


def execute_plan(plan: MergePlan, method: MergeMethod, out_dir: str | Path, *, seed: int = 0, signals=None,
                 shard_size_mb: float = DEFAULT_SHARD_MB, progress: Progress | None = None, cancel=None,
                 coefficients_file: str | Path | None = None,
                 element_coefficients_limit_mb: int = ELEMENT_COEFFICIENTS_LIMIT_MB) -> EngineResult:
    """Merge every planned tensor into ``out_dir`` (an existing, empty directory; the caller makes
    it atomic, see ``atomic_output``). Writes the weights plus adapter_config.json (adapter output)
    or the base's config files (dense output); when ``coefficients_file`` is given, also streams
    the lam table and the element coefficients the method produces into it."""
    out_dir = Path(out_dir)
    _check_method_inputs(plan, method, signals)
    progress = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    adapter = plan.output_format == "adapter"
    writer = ShardWriter(out_dir, plan.outputs, max_shard_bytes=None if adapter else int(shard_size_mb * 2**20),
                         single_name=ADAPTER_WEIGHTS if adapter else "model.safetensors")
    coef_writer, coef_info = _coefficient_writer(plan, method, signals, coefficients_file, element_coefficients_limit_mb)
    ex = _Executor(plan, method, seed=seed, signals=signals)
    stats: list[dict[str, Any]] = []
    try:
        if coef_writer is not None and coef_info.get("lam"):
            coef_writer.write("lam", signals.lam.to(torch.float32).contiguous())
        total = len(plan.tasks)
        progress("merge", 0, total)
        for i, task in enumerate(plan.tasks):
            if cancel is not None and cancel.is_set():
                raise MergeCancelled(f"merge cancelled after {i} of {total} tensors; nothing was written")
            _run_task(ex, task, writer, coef_writer, stats)
            progress("merge", i + 1, total)
        files = writer.finish()
        if coef_writer is not None:
            coef_writer.finish()
    finally:
        writer.close()
        if coef_writer is not None:
            coef_writer.close()
        ex.close()
    _write_backbone_config(plan, out_dir)
    return EngineResult(files=files, tensor_stats=stats, expert_hashes=ex.hashes.result(),
                        bytes_read=ex.bytes_read, bytes_written=writer.bytes_written,
                        seconds=time.perf_counter() - t0, coefficients=coef_info, rules=ex.rules)


def _run_task(ex: _Executor, task: Task, writer: ShardWriter, coef_writer: ShardWriter | None, stats: list) -> None:
    if task.kind in ("copy", "copy_equal"):
        base = ex.read(task.base)
        if task.kind == "copy_equal":  # non-float tensors (buffers): every expert must agree
            for e, (src,) in enumerate(task.experts):
                other = ex.read(src)
                ex.hashes.add(e, src, other)
                if not torch.equal(other, base):
                    raise MergeError(f"expert {ex.plan.expert_names[e]!r}: non-float tensor {task.key!r} differs from the base; it cannot be merged")
        writer.write(task.outputs[0].key, base)
        return
    deltas = ex.deltas(task)
    norms = torch.linalg.vector_norm(deltas.reshape(deltas.shape[0], -1), dim=1)
    ctx = ex.context(task)
    merged = ex.method.merge_tensor(deltas, ctx)
    if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != task.shape:
        got = list(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
        raise MergeError(f"method {ex.method.name!r} returned {got} for tensor {task.key!r}, expected {list(task.shape)}")
    merged = merged.to(torch_dtype(task.work_dtype))
    stats.append(_stats(task, norms, merged, ctx.extras))
    if "rule" in ctx.extras:
        ex.rules[ctx.extras["rule"]] = ex.rules.get(ctx.extras["rule"], 0) + 1
    if coef_writer is not None and coef_writer.planned(f"element/{task.key}"):
        w = ctx.extras.get("element_coefficients")
        if w is None:
            raise MergeError(f"method {ex.method.name!r} produced no element coefficients for {task.key!r}")
        coef_writer.write(f"element/{task.key}", w.detach().to(torch.float32).contiguous())
    for spec, tensor in zip(task.outputs, _finish(ex, task, merged)):
        writer.write(spec.key, tensor.to(torch_dtype(spec.dtype)))


def _finish(ex: _Executor, task: Task, merged: torch.Tensor) -> list[torch.Tensor]:
    if task.kind == "factor":
        return [merged]
    if task.kind == "lora_delta" and task.base is None:
        return list(svd_factor(merged, ex.plan.rank))
    # dense output: base + merged, added chunk by chunk into the method's result
    # (the engine owns it from here; a + b == b + a exactly in IEEE arithmetic)
    out = merged.contiguous()
    flat = out.view(-1)
    for start, chunk in ex.chunks(task.base, out.dtype):
        flat[start:start + chunk.numel()].add_(chunk)
    return [out]


def _coefficient_writer(plan: MergePlan, method: MergeMethod, signals, path, limit_mb: int):
    info: dict[str, Any] = {"lam": False, "element": False}
    if path is None:
        return None, info
    outputs: list[OutSpec] = []
    if signals is not None and getattr(method, "needs_layer_coefficients", False):
        outputs.append(OutSpec("lam", tuple(signals.lam.shape), "F32"))
        info["lam"] = True
    if signals is not None and getattr(method, "needs_element_scores", False):
        n_exp = len(plan.expert_names)
        elems = [OutSpec(f"element/{t.key}", (n_exp, *t.shape), "F32") for t in plan.tasks
                 if t.layer is not None and t.kind not in ("copy", "copy_equal")]
        size = sum(o.nbytes for o in elems)
        if size <= limit_mb * 2**20:
            outputs.extend(elems)
            info["element"] = True
        else:
            info["element_skipped"] = f"{size / 2**20:.0f} MiB of element coefficients exceed the {limit_mb} MiB limit"
    metadata = {"expert_names": json.dumps(plan.expert_names), "method": method.name,
                "layout": "lam: [experts, layers]; element/<tensor key>: [experts, *shape]"}
    name = Path(path).name
    return ShardWriter(Path(path).parent, outputs, max_shard_bytes=None, single_name=name, metadata=metadata), info


_CONFIG_FILES = ("config.json", "generation_config.json")


def _write_backbone_config(plan: MergePlan, out_dir: Path) -> None:
    if plan.output_format == "adapter":
        (out_dir / ADAPTER_CONFIG).write_text(json.dumps(plan.adapter_config, indent=2, sort_keys=True))
        return
    for name in _CONFIG_FILES:
        if (plan.base_dir / name).exists():
            shutil.copy2(plan.base_dir / name, out_dir / name)


# ============================================================== atomic output
@contextmanager
def atomic_output(out: str | Path, *, overwrite: bool = False, protect: list[Path] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds.

    On any exception (cancellation and KeyboardInterrupt included) the temporary directory is
    removed, so an interrupted merge leaves nothing. An existing ``out`` is refused unless
    ``overwrite``; it is then replaced only at the very end. ``protect``: input directories that
    ``out`` must not be (or contain)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise MergeError(f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise MergeError(f"output path {out} exists and is not a directory")
    if out == Path(out.anchor) or out == Path.home().absolute():
        raise MergeError(f"refusing to write a merge to {out}")
    for p in protect or []:
        p = Path(p).expanduser().absolute()
        if p == out or out in p.parents:
            raise MergeError(f"output directory {out} would replace the input {p}; choose another --out")
    with staged_directory(out) as tmp:
        yield tmp


def merge(base_dir: str | Path, experts: list[ExpertSpec], method: MergeMethod, out: str | Path, *,
          mode: str | None = None, rank: int | None = None, seed: int = 0, signals=None,
          overwrite: bool = False, shard_size_mb: float = DEFAULT_SHARD_MB,
          progress: Progress | None = None, cancel=None) -> EngineResult:
    """Plan and stream a merge into ``out`` atomically (weights and backbone config only; the full
    merged-model directory is ``merge_api.run_merge``)."""
    progress = progress or (lambda stage, done, total: None)
    with atomic_output(out, overwrite=overwrite, protect=[Path(base_dir)] + [e.path for e in experts]) as tmp:
        progress("plan", 0, 1)
        plan = plan_merge(base_dir, experts, mode=mode, rank=rank)
        progress("plan", 1, 1)
        return execute_plan(plan, method, tmp, seed=seed, signals=signals, shard_size_mb=shard_size_mb,
                            progress=progress, cancel=cancel)


# ============================================================== in-memory reference
def reference_merge(base_dir: str | Path, experts: list[ExpertSpec], method: MergeMethod, *,
                    mode: str | None = None, rank: int | None = None, seed: int = 0,
                    signals=None) -> dict[str, torch.Tensor]:
    """The same merge with every file loaded whole (``safetensors.torch.load_file``) and plain
    out-of-place tensor expressions: what the streaming engine must equal bit for bit."""
    from safetensors.torch import load_file

    plan = plan_merge(base_dir, experts, mode=mode, rank=rank)
    _check_method_inputs(plan, method, signals)
    loaded: dict[Path, dict[str, torch.Tensor]] = {}

    def get(src: Source) -> torch.Tensor:
        if src.file not in loaded:
            loaded[src.file] = load_file(str(src.file))
        return loaded[src.file][src.key]

    out: dict[str, torch.Tensor] = {}
    for task in plan.tasks:
        if task.kind in ("copy", "copy_equal"):
            out[task.key] = get(task.base).clone()
            continue
        wd = torch_dtype(task.work_dtype)
        if task.kind == "factor":
            deltas = torch.stack([get(s[0]).to(wd) * sc for s, sc in zip(task.experts, task.scales)])
        elif task.kind == "lora_delta":
            mats = [get(b).to(wd) @ get(a).to(wd) for a, b in task.experts]
            deltas = torch.stack([(m.T if task.transpose else m) * sc for m, sc in zip(mats, task.scales)])
        else:
            base = get(task.base).to(wd)
            deltas = torch.stack([get(s[0]).to(wd) - base for s in task.experts])
        s = tensor_seed(seed, task.key)
        ctx = TensorContext(key=task.key, layer=task.layer, generator=torch.Generator().manual_seed(s), seed=s)
        ctx = _attach_signals(ctx, task, method, signals, len(plan.expert_names))
        merged = method.merge_tensor(deltas, ctx).to(wd)
        if task.kind == "factor":
            results = [merged]
        elif task.kind == "lora_delta" and task.base is None:
            results = list(svd_factor(merged, plan.rank))
        else:
            results = [get(task.base).to(wd) + merged]
        for spec, tensor in zip(task.outputs, results):
            out[spec.key] = tensor.to(torch_dtype(spec.dtype))
    return out
