"""Merge methods, one module each, in one registry (``base.REGISTRY``).

Importing this package registers every method, so ``get_method(name, **params)`` works.
"""
from __future__ import annotations

from es_merging.methods.base import (
    REGISTRY,
    MergeMethod,
    Param,
    TensorContext,
    get_method,
    parse_set_options,
    register,
)
from es_merging.methods import average, dare, es, task_arithmetic, ties  # noqa: E402,F401  (register)

__all__ = [
    "REGISTRY",
    "MergeMethod",
    "Param",
    "TensorContext",
    "get_method",
    "parse_set_options",
    "register",
]
