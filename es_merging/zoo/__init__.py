"""The embedded default: a tiny world with a base model and three experts, built offline."""
from __future__ import annotations

import json
from pathlib import Path

from es_merging.errors import EsMergingError


def load_zoo_report(zoo_dir: str | Path) -> dict:
    path = Path(zoo_dir) / "zoo.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EsMergingError(f"{path} not found: build the zoo first with `es-merging zoo build --out {zoo_dir}`") from None
    except ValueError as exc:
        raise EsMergingError(f"{path} is not valid JSON ({exc}); rebuild the zoo") from None


def zoo_world(zoo_dir: str | Path):
    """Regenerate the world a zoo was built from (it is a pure function of its seed)."""
    from es_merging.zoo.world import World

    report = load_zoo_report(zoo_dir)
    return World.generate(report["world"]["seed"], per_class=report["world"]["per_class"])


DIVERSE_POOL = 8  # 'diverse' picks n of this many times n candidate samples


def probe_from_zoo(zoo_dir: str | Path, n: int = 64, seed: int = 0, split: str = "train", strategy: str = "random"):
    """An unlabeled probe of n samples drawn from the zoo's world (raw inputs only).

    ``random``: n samples of the world's seeded stream. ``diverse``: MaxMin on the drugs' Morgan
    fingerprints over a candidate pool of ``DIVERSE_POOL`` x n samples of that stream (the world
    reuses its molecules across samples, so the pool must be larger than n for a choice to exist)."""
    from es_merging.errors import ProbeError
    from es_merging.probe import MAX_PROBE_SAMPLES, build_probe
    from es_merging.zoo.train import to_probe_sample

    if strategy not in ("random", "diverse"):
        raise ProbeError(f"unknown sampling strategy {strategy!r}; use 'random' or 'diverse'")
    if not 1 <= n <= MAX_PROBE_SAMPLES:
        raise ProbeError(f"probe size n={n} must be between 1 and {MAX_PROBE_SAMPLES}")
    world = zoo_world(zoo_dir)
    pool = n if strategy == "random" else min(n * DIVERSE_POOL, MAX_PROBE_SAMPLES)
    samples = []
    for i, ws in enumerate(world.samples(pool, split, seed=seed + 1000)):
        s = to_probe_sample(ws, i)
        samples.append(s.model_copy(update={"descriptors": {}, "answer": None}))
    probe = build_probe(samples, n=n, source=f"zoo:{Path(zoo_dir).name}", seed=seed, strategy=strategy)
    probe.meta["candidates"] = pool
    return probe
