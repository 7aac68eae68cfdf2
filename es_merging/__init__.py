"""es-merging: ES-Merging for biological multimodal LLMs.

The library knows nothing of MCP; ``server/``, ``tools/`` and ``prompts/`` wrap it.
"""
from __future__ import annotations

__version__ = "0.1.0"

from es_merging.errors import (  # noqa: E402
    EsMergingError,
    ExpertError,
    InvalidInputError,
    MergeError,
    PathNotAllowedError,
    ProbeError,
)

__all__ = [
    "__version__",
    "EsMergingError",
    "ExpertError",
    "InvalidInputError",
    "MergeError",
    "PathNotAllowedError",
    "ProbeError",
    "load_model",
]


def load_model(path, **kwargs):
    """Load a merged-model directory (or a base/expert directory) as a ready multimodal model."""
    from es_merging.artifact import load_model as _load

    return _load(path, **kwargs)
