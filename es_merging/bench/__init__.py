"""Benchmarks, one registry: ``BENCHES[name](args) -> dict`` (JSON-ready).

A bench module registers itself with ``@register("name", add_arguments=...)``; ``load_benches()``
imports every module of this package so that `es-merging bench NAME` finds it. ``add_arguments``
declares the bench's own options on an argparse parser (the CLI parses them after NAME)."""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
from typing import Any, Callable

log = logging.getLogger(__name__)

Bench = Callable[[argparse.Namespace], dict]
BENCHES: dict[str, Bench] = {}


def register(name: str, *, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
             help: str | None = None) -> Callable[[Bench], Bench]:
    def deco(fn: Bench) -> Bench:
        if name in BENCHES and BENCHES[name] is not fn:
            raise RuntimeError(f"bench {name!r} registered twice")
        fn.add_arguments = add_arguments  # type: ignore[attr-defined]
        doc = (fn.__doc__ or "").strip()
        fn.help = help or (doc.splitlines()[0] if doc else "")  # type: ignore[attr-defined]
        BENCHES[name] = fn
        return fn

    return deco


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=5000, help="items per modality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)


def _register_inspect() -> None:
    """inspect_bench exposes ``bench_inspect(n, seed, repeats)``; wrap it unless it registered itself."""
    if "inspect" in BENCHES:
        return
    from es_merging.bench.inspect_bench import bench_inspect

    def inspect_bench(args: argparse.Namespace) -> dict[str, Any]:
        """Throughput of the molecule/protein/cell inspect functions."""
        return bench_inspect(args.n, args.seed, args.repeats)

    register("inspect", add_arguments=_inspect_arguments)(inspect_bench)


def load_benches() -> dict[str, Bench]:
    """Import every bench module (each registers itself) and return the registry."""
    import es_merging.bench as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    if importlib.util.find_spec("es_merging.bench.inspect_bench") is not None:
        _register_inspect()
    return BENCHES
