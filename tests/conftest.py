"""Shared fixtures. Tests never download anything and never copy ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("ES_MERGING_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real public datasets; tests that need them skip with the reason when absent."""
    path = _data_dir()
    if not (path / "SOURCES.md").exists():
        pytest.skip(f"real datasets not found at {path} (set ES_MERGING_DATA_DIR or put ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """The embedded zoo, test preset, built once per test session (about 20-40 s on 2 cores).

    Set ES_MERGING_TEST_ZOO to a prebuilt test-preset zoo to skip the build while iterating."""
    prebuilt = os.environ.get("ES_MERGING_TEST_ZOO")
    if prebuilt:
        return Path(prebuilt)
    from es_merging.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "zoo"
    build_zoo(out, preset="test", seed=0)
    return out


@pytest.fixture(scope="session")
def zoo_probe(zoo_dir, tmp_path_factory) -> Path:
    """A 24-sample probe drawn from the zoo's world."""
    from es_merging.zoo import probe_from_zoo

    path = tmp_path_factory.mktemp("probe") / "probe.json"
    probe_from_zoo(zoo_dir, n=24, seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def zoo_model(zoo_dir):
    """The zoo's base with all three adapters and both encoders (one per test module: tests switch
    adapters, so modules do not share it)."""
    from es_merging.mllm import MultimodalModel

    return MultimodalModel.load(
        zoo_dir / "base",
        adapters={m: zoo_dir / m for m in ("molecule", "protein", "cell")},
        encoders={m: zoo_dir / m / "encoder" for m in ("molecule", "protein")},
    )
