"""``run_merge``: the one entry point the CLI, the Python API and the MCP job runner share.

Order matters: everything cheap that can refuse the merge (expert specs, method parameters, base
compatibility, probe presence, output directory) runs before the expensive signal collection, and
everything that writes goes into one temporary directory renamed into place at the very end."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from es_merging.artifact import write_artifact
from es_merging.engine import Progress, atomic_output, execute_plan, plan_merge
from es_merging.errors import MergeError
from es_merging.experts import check_compatible, load_expert_spec
from es_merging.methods.base import get_method
from es_merging.options import MergeOptions


@dataclass
class MergeResult:
    out_dir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "out": str(self.out_dir), "method": m["method"], "mode": m["mode"], "rank": m["rank"],
            "backbone": m["backbone"], "experts": [{k: e[k] for k in ("name", "modality", "kind", "weights_hash")} for e in m["experts"]],
            "base_hash": m["base"]["hash"], "base_bundled": m["base"]["bundled"], "timings": self.timings,
        }


def _signals(opts: MergeOptions, experts, method, mode: str, progress: Progress):
    from es_merging.signals import compute_signals  # needs the model stack: imported only for the ES family

    return compute_signals(opts.base, experts, opts.probe, mode=mode, method=method, seed=opts.seed,
                           batch_size=opts.batch_size, progress=progress, device=opts.device)


def run_merge(opts: MergeOptions, *, progress: Progress | None = None, cancel=None) -> MergeResult:
    """Merge ``opts.experts`` onto ``opts.base`` into the merged-model directory ``opts.out``.

    ``opts.bundle_base``: copy the base into ``out/base`` for LoRA outputs (None: when under 2 GB)."""
    progress = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    progress("plan", 0, 1)
    experts = [load_expert_spec(p) for p in opts.experts]
    method = get_method(opts.method, **opts.params)
    needs_probe = bool(getattr(method, "needs_probe", False))
    if needs_probe and opts.probe is None:
        raise MergeError(f"method {method.name!r} computes signals from a probe: pass --probe probe.json "
                         "(build one with `es-merging probe build`), or choose a baseline method")
    if opts.probe is not None and not Path(opts.probe).is_file():
        raise MergeError(f"probe {opts.probe} does not exist")
    digest = check_compatible(opts.base, experts, require_modality=needs_probe)
    protect = [Path(opts.base)] + [e.path for e in experts]
    with atomic_output(opts.out, overwrite=opts.overwrite, protect=protect) as tmp:
        plan = plan_merge(opts.base, experts, mode=opts.mode, rank=opts.rank)
        timings["plan"] = round(time.perf_counter() - t, 4)
        progress("plan", 1, 1)
        signals = None
        if needs_probe:
            t = time.perf_counter()
            progress("signals", 0, 1)
            signals = _signals(opts, experts, method, plan.mode, progress)
            timings["signals"] = round(time.perf_counter() - t, 4)
            if cancel is not None and cancel.is_set():
                from es_merging.engine import MergeCancelled

                raise MergeCancelled("merge cancelled after the signals; nothing was written")
        t = time.perf_counter()
        result = execute_plan(plan, method, tmp, seed=opts.seed, signals=signals, shard_size_mb=opts.shard_size_mb,
                              progress=progress, cancel=cancel, coefficients_file=tmp / "coefficients.safetensors")
        timings["merge"] = round(time.perf_counter() - t, 4)
        progress("write", 0, 1)
        options = opts.model_dump(mode="json")
        manifest = write_artifact(tmp, plan=plan, result=result, experts=experts, base_dir=Path(opts.base),
                                  base_digest=digest, method=method, seed=opts.seed, signals=signals,
                                  probe_path=Path(opts.probe) if opts.probe else None, timings=timings,
                                  bundle_base=opts.bundle_base, options=options, final_name=Path(opts.out).name)
        timings = manifest["timings"]
    progress("write", 1, 1)
    return MergeResult(out_dir=Path(opts.out).expanduser().absolute(), manifest=manifest, timings=timings)
