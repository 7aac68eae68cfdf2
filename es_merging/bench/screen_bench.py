"""`es-merging bench screen`: screening throughput (predictions per second) for the 3-option task
``triple_effect`` with the embedded zoo, at several screen sizes, and a least-squares fit
``seconds = a + b * rows`` that shows whether time grows linearly with the number of triples.

Each size is a full :func:`es_merging.screen.screen` call (validation, encoders, scoring, spooled
rows, ranked CSV) with the model's encoder cache cleared first, so every distinct input is encoded
inside the timed region. Entities are the zoo world's molecules, proteins and cells; the product is
drugs x 5 proteins x 5 cells, the number of drugs growing with the size. A warm-up screen runs first.

Reported per size: wall seconds and predictions per second, and CPU seconds (process time, all
threads) with predictions per CPU-second: on a shared machine the wall rate depends on the other
processes (the load averages are recorded), the CPU rate much less. Both get a linear fit.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from es_merging.bench import register
from es_merging.errors import EsMergingError

TARGET_PER_SECOND = 200.0


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise EsMergingError("a linear fit needs at least two different sizes")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_s": a, "seconds_per_row": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "max_relative_residual": max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys) if y > 0)}


def run_screen_bench(*, zoo: str | None = None, preset: str = "tiny", expert: str = "molecule",
                     sizes: list[int] = (250, 500, 1000, 2000), batch_size: int = 32, threads: int | None = None,
                     repeats: int = 1, progress=None) -> dict[str, Any]:
    import torch

    from es_merging.bench.embedded import resolve_zoo
    from es_merging.predict import load_zoo_model
    from es_merging.screen import screen
    from es_merging.zoo import zoo_world

    if threads:
        torch.set_num_threads(threads)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    sizes = sorted(set(int(s) for s in sizes))
    if len(sizes) < 2 or sizes[0] < 25:
        raise EsMergingError("give at least two sizes, each >= 25 rows")
    with tempfile.TemporaryDirectory(prefix="es-merging-bench-screen-") as tmp:
        tmp_path = Path(tmp)
        zoo_dir, zoo_info = resolve_zoo(zoo, preset, tmp_path, progress)
        model = load_zoo_model(zoo_dir, expert)
        world = zoo_world(zoo_dir)
        molecules = [e.raw for e in world.heldout["molecule"] + world.train["molecule"]]
        proteins = [(f"P{i}", e.raw) for i, e in enumerate(world.heldout["protein"][:5])]
        cells = [(f"C{i}", list(e.raw)) for i, e in enumerate(world.heldout["cell"][:5])]
        per_drug = len(proteins) * len(cells)
        if sizes[-1] // per_drug > len(molecules):
            raise EsMergingError(f"the zoo has {len(molecules)} molecules: sizes up to {len(molecules) * per_drug} rows")
        # warm-up (allocator, kernels), not timed
        screen(model, "triple_effect", out=tmp_path / "warm.csv", smiles=molecules[-2:], proteins=proteins,
               cells=cells, batch_size=batch_size)
        runs = []
        for size in sizes:
            drugs = molecules[: max(1, size // per_drug)]
            best = cpu_best = None
            for _ in range(repeats):
                model.clear_cache()
                t, c = time.perf_counter(), time.process_time()
                res = screen(model, "triple_effect", out=tmp_path / f"screen-{size}.csv", smiles=drugs,
                             proteins=proteins, cells=cells, batch_size=batch_size)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                best = dt if best is None else min(best, dt)
                cpu_best = dc if cpu_best is None else min(cpu_best, dc)
            runs.append({"rows": res.rows, "drugs": len(drugs), "proteins": len(proteins), "cells": len(cells),
                         "seconds": round(best, 4), "predictions_per_second": round(res.rows / best, 1),
                         "cpu_seconds": round(cpu_best, 4),
                         "predictions_per_cpu_second": round(res.rows / cpu_best, 1)})
            if progress:
                progress("screen bench", len(runs), len(sizes))
        fit = linear_fit([r["rows"] for r in runs], [r["seconds"] for r in runs])
        cpu_fit = linear_fit([r["rows"] for r in runs], [r["cpu_seconds"] for r in runs])
        largest = runs[-1]
        return {
            "bench": "screen",
            "task": "triple_effect (3 options: Strong effect / Weak effect / No effect)",
            "model": f"zoo {zoo_info['preset']} preset, expert {expert!r} active (one LoRA, as a merged model)",
            "zoo": zoo_info,
            "batch_size": batch_size,
            "runs": runs,
            "fit": {k: round(v, 6) for k, v in fit.items()},
            "marginal_predictions_per_second": round(1 / fit["seconds_per_row"], 1) if fit["seconds_per_row"] > 0 else None,
            "linear": fit["r2"] >= 0.99,
            "cpu_fit": {k: round(v, 6) for k, v in cpu_fit.items()},
            "cpu_linear": cpu_fit["r2"] >= 0.99,
            "predictions_per_cpu_second": largest["predictions_per_cpu_second"],
            "predictions_per_second": largest["predictions_per_second"],
            "target_per_second": TARGET_PER_SECOND,
            "meets_target": largest["predictions_per_second"] >= TARGET_PER_SECOND,
            "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "note": ("wall-clock rates depend on what else runs on the machine (see the load averages); "
                     "CPU seconds (process time, all threads) measure the work itself"),
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
        }


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", default=None, help="a built zoo (default $ES_MERGING_ZOO_DIR, else build --preset)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "test"))
    p.add_argument("--expert", default="molecule", help="active adapter: an expert name or 'base'")
    p.add_argument("--sizes", default="250,500,1000,2000", help="comma-separated screen sizes (rows)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="runs per size; the fastest counts")


@register("screen", add_arguments=_arguments)
def bench_screen(args: argparse.Namespace) -> dict[str, Any]:
    """Screening throughput (3-option task) at several sizes, with a linear fit of time vs rows."""
    from es_merging.cli.progress import ProgressPrinter

    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    return run_screen_bench(zoo=args.zoo, preset=args.preset, expert=args.expert, sizes=sizes,
                            batch_size=args.batch_size, threads=args.threads, repeats=args.repeats,
                            progress=ProgressPrinter())
