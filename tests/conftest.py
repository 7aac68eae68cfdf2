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
