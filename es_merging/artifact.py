"""The merged-model directory (DESIGN section 5) and ``load_model``.

    es_merging.json            manifest (written last: its presence means the directory is complete)
    adapter_config.json + adapter_model.safetensors      LoRA output (factor, or delta with --rank)
    config.json + model*.safetensors (+ index)           dense output
    base/                      the base checkpoint, bundled for LoRA output when small enough
    encoders/<modality>/       copied from each owning expert
    tokenizer files            copied from the base
    coefficients.safetensors   lam [E, L] and element coefficients, when the method has them
    report.json                method, stage timings, lambda table, per-tensor statistics
    layer_coefficients.png     heatmap experts x layers (layer-coefficient methods only)
    README.md                  model card
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from es_merging.engine import EngineResult, MergePlan
from es_merging.errors import ExpertError
from es_merging.experts import ExpertSpec, base_hash, checkpoint_files

MANIFEST = "es_merging.json"
FORMAT = "es-merging-model/1"
BUNDLE_LIMIT_BYTES = 2 * 1024**3  # auto-bundle the base below this size (DESIGN: the dir loads alone)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
BASE_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES
HEATMAP = "layer_coefficients.png"


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors", "es-merging"):
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    if out["es_merging"] is None:
        from es_merging import __version__

        out["es_merging"] = __version__
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def tree_sha256(directory: Path) -> str:
    """Hash of every file under ``directory`` (relative names and bytes), for encoders."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(directory)).encode() + b"\0")
        h.update(file_sha256(f).encode())
    return "sha256:" + h.hexdigest()


def _copy_tokenizer(base_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
            copied.append(name)
    return copied


def _bundle_base(base_dir: Path, out: Path) -> None:
    """Copy the base checkpoint (weights, configs, tokenizer) into ``out``."""
    out.mkdir()
    files = checkpoint_files(base_dir)
    for f in files:
        shutil.copy2(f, out / f.name)
    for name in BASE_FILES + ("model.safetensors.index.json",):
        if (base_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(base_dir / name, out / name)


def _base_size(base_dir: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(base_dir))


def _lambda_table(signals, plan: MergePlan) -> list[dict[str, Any]] | None:
    if signals is None:
        return None
    lam = signals.lam
    return [{"expert": name, "lambda": [round(float(x), 6) for x in lam[e]]} for e, name in enumerate(plan.expert_names)]


def plot_layer_coefficients(lam, expert_labels: list[str], path: Path, title: str) -> None:
    """Heatmap of lam [E, L], experts x layers, each cell annotated with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = lam.detach().float().cpu().numpy()
    n_exp, n_layers = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * n_layers + 2.5), max(2.2, 0.6 * n_exp + 1.4)), dpi=110)
    im = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(data.max())), aspect="auto")
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_yticks(range(n_exp), expert_labels)
    ax.set_xlabel("decoder layer")
    ax.set_title(title, fontsize=10)
    if n_exp * n_layers <= 400:  # annotations stay readable
        threshold = float(data.max()) / 2
        for e in range(n_exp):
            for layer in range(n_layers):
                v = data[e, layer]
                ax.text(layer, e, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > threshold else "white")
    fig.colorbar(im, ax=ax, label="lambda")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_artifact(out: Path, *, plan: MergePlan, result: EngineResult, experts: list[ExpertSpec],
                   base_dir: Path, base_digest: str, method, seed: int, signals=None,
                   probe_path: Path | None = None, timings: dict[str, float], bundle_base: bool | None = None,
                   options: dict[str, Any] | None = None, final_name: str | None = None) -> dict[str, Any]:
    """Write everything but the weights (already streamed into ``out`` by the engine); returns the
    manifest. ``out`` is the merge's temporary directory."""
    t0 = time.perf_counter()
    out, base_dir = Path(out), Path(base_dir).resolve()
    encoders: dict[str, str] = {}
    for e in experts:
        if e.encoder_dir and e.modality:
            if e.modality in encoders:
                raise ExpertError(f"two experts own an encoder for modality {e.modality!r}; keep one")
            shutil.copytree(e.encoder_dir, out / "encoders" / e.modality)
            encoders[e.modality] = e.name
    tokenizer = _copy_tokenizer(base_dir, out)
    adapter = plan.output_format == "adapter"
    bundled = False
    if adapter:
        if bundle_base is None:
            bundle_base = _base_size(base_dir) < BUNDLE_LIMIT_BYTES
        if bundle_base:
            _bundle_base(base_dir, out / "base")
            bundled = True
    lam_table = _lambda_table(signals, plan) if getattr(method, "needs_layer_coefficients", False) else None
    heatmap = None
    if lam_table is not None:
        labels = [e.name if e.modality in (None, e.name) else f"{e.name} ({e.modality})" for e in experts]
        plot_layer_coefficients(signals.lam, labels, out / HEATMAP, f"{method.name}: layer coefficients lambda[e, l]")
        heatmap = HEATMAP
    timings = {**timings, "write": round(time.perf_counter() - t0, 4)}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created_at": created,
        "base": {"path": str(base_dir), "hash": base_digest, "bundled": bundled, "dir": "base" if bundled else None},
        "experts": [
            {"name": e.name, "path": str(e.path), "modality": e.modality, "kind": e.kind, "rank": e.rank,
             "lora_scaling": e.lora_scaling if e.kind == "lora" else None,
             "weights_hash": h, "declared_base_hash": e.base_hash,
             "encoder_hash": tree_sha256(e.encoder_dir) if e.encoder_dir else None}
            for e, h in zip(experts, result.expert_hashes)
        ],
        "method": {"name": method.name, "params": dict(method.values)},
        "mode": plan.mode,
        "rank": plan.rank,
        "backbone": {"format": plan.output_format, "files": result.files,
                     "adapter_name": "merged" if adapter else None},
        "encoders": encoders,
        "tokenizer_files": tokenizer,
        "probe": {"path": str(probe_path), "hash": file_sha256(probe_path)} if probe_path else None,
        "seeds": {"seed": seed, "per_tensor": "sha256(f'{seed}:{key}')[:8] little-endian & (2**63-1)",
                  "signals": (signals.meta.get("seed", seed) if signals is not None else None)},
        "coefficients": result.coefficients,
        "versions": package_versions(),
        "timings": timings,
        "options": options or {},
        "files": {"report": "report.json", "coefficients": "coefficients.safetensors", "heatmap": heatmap,
                  "model_card": "README.md"},
    }
    report = {
        "method": manifest["method"], "mode": plan.mode, "rank": plan.rank, "timings": timings,
        "plan": plan.summary(), "lambda": lam_table,
        "signals": {k: v for k, v in (signals.meta.items() if signals is not None else []) if _jsonable(v)},
        "rules_applied": result.rules, "coefficients": result.coefficients,
        "bytes_read": result.bytes_read, "bytes_written": result.bytes_written,
        "tensors": result.tensor_stats,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "README.md").write_text(model_card(manifest, lam_table, out_name=final_name or out.name))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the directory complete
    return manifest


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def model_card(manifest: dict[str, Any], lam_table: list[dict] | None, out_name: str = "") -> str:
    m = manifest
    lines = [f"# Merged model ({m['method']['name']}, {m['mode']} mode)", "",
             f"Created {m['created_at']} by es-merging {m['versions'].get('es_merging')}.", "",
             "## What was merged", "",
             f"Base: `{m['base']['path']}` (`{m['base']['hash'][:23]}...`)"
             + (", bundled in `base/`" if m["base"]["bundled"] else ", referenced by path"), "",
             "| expert | modality | kind | rank | weights hash |", "| --- | --- | --- | --- | --- |"]
    for e in m["experts"]:
        lines.append(f"| {e['name']} | {e['modality'] or '-'} | {e['kind']} | {e['rank'] or '-'} | `{e['weights_hash'][:30]}...` |")
    params = ", ".join(f"{k}={v}" for k, v in m["method"]["params"].items()) or "none"
    lines += ["", "## How", "",
              f"- method: `{m['method']['name']}` ({params})",
              f"- mode: `{m['mode']}`" + (f", re-factored to rank {m['rank']}" if m["rank"] else ""),
              f"- output: {'PEFT LoRA adapter (lora_alpha == r: each expert scaling is folded into B)' if m['backbone']['format'] == 'adapter' else 'full checkpoint (base + merged delta)'}",
              f"- seed: {m['seeds']['seed']}" + (f"; probe `{m['probe']['path']}` (`{m['probe']['hash'][:23]}...`)" if m["probe"] else ""),
              "- stage timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in m["timings"].items()), ""]
    if lam_table:
        n_layers = len(lam_table[0]["lambda"])
        lines += ["## Layer coefficients lambda[e, l]", "", "![layer coefficients](layer_coefficients.png)", "",
                  "| expert | " + " | ".join(f"L{i}" for i in range(n_layers)) + " |",
                  "| --- |" + " --- |" * n_layers]
        lines += [f"| {row['expert']} | " + " | ".join(f"{x:.3f}" for x in row["lambda"]) + " |" for row in lam_table]
        lines.append("")
    if m["encoders"]:
        lines += ["## Encoders", ""] + [f"- `encoders/{mod}/` from expert {name}" for mod, name in m["encoders"].items()] + [""]
    lines += ["## How to load", "", "```python", "import es_merging", "",
              f'model = es_merging.load_model("{out_name or "."}")  # verifies the base hash', "```", ""]
    if m["backbone"]["format"] == "adapter":
        lines += ["With PEFT alone: load the base (`base/` or the path above) with transformers, then",
                  "`PeftModel.from_pretrained(base_model, this_directory)`.", ""]
    else:
        lines += ["With transformers alone: `AutoModelForCausalLM.from_pretrained(this_directory)`.", ""]
    lines += ["Full details: `es_merging.json` (manifest) and `report.json`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ loading
def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    f = path / MANIFEST
    if not path.is_dir():
        raise ExpertError(f"merged model {path}: not a directory")
    if not f.is_file():
        raise ExpertError(f"merged model {path}: {MANIFEST} is missing (not an es-merging output, or an interrupted copy)")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as exc:
        raise ExpertError(f"{f}: garbled manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExpertError(f"{f}: expected \"format\": \"{FORMAT}\"")
    for k in ("base", "backbone", "encoders"):
        if k not in manifest:
            raise ExpertError(f"{f}: manifest has no {k!r} entry")
    return manifest


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ExpertError(f"merged model: {what} {path} is missing")
    return path


def load_model(path: str | Path, device: str = "cpu", **kwargs):
    """A ready ``MultimodalModel``: the merged adapter (named "merged", active) on the verified base,
    or the dense merged checkpoint as backbone, plus the bundled encoders."""
    from es_merging.mllm import MultimodalModel

    path = Path(path).expanduser().resolve()
    manifest = read_manifest(path)
    for name in manifest["backbone"].get("files", []):
        _need(path / name, "weights file")
    encoders = {m: _need(path / "encoders" / m, f"encoder for {m!r}") for m in manifest["encoders"]}
    tokenizer_dir = path if manifest.get("tokenizer_files") else None
    if manifest["backbone"]["format"] == "adapter":
        _need(path / "adapter_config.json", "adapter config")
        base = manifest["base"]
        base_dir = path / base["dir"] if base.get("bundled") else Path(base["path"])
        _need(base_dir, "base checkpoint")
        actual = base_hash(base_dir)
        if actual != base["hash"]:
            raise ExpertError(f"merged model {path}: base {base_dir} has hash {actual[:23]}..., "
                              f"the merge was made on {base['hash'][:23]}...; restore the original base")
        model = MultimodalModel.load(base_dir, adapters={"merged": path}, encoders=encoders,
                                     tokenizer_dir=tokenizer_dir or base_dir, device=device, **kwargs)
        model.set_adapter("merged")
        return model
    _need(path / "config.json", "config")
    return MultimodalModel.load(path, encoders=encoders, tokenizer_dir=tokenizer_dir, device=device, **kwargs)
