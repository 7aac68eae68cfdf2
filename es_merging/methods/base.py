"""Merge-method protocol and registry.

A method merges ONE output tensor at a time from the experts' deltas (mergekit style: small pure
tasks the engine streams through). Each method declares its parameters once, as ``Param`` objects;
the CLI (`--set name=value`), the Python API and the MCP tools all read that declaration.

Deltas, by mode:
- factor mode (LoRA experts): the expert's LoRA A or B tensor itself (B with its scaling folded in);
  the "base" of an adapter tensor is zero, so the merged delta IS the merged tensor.
- delta mode / dense experts: ``W_e - W_base`` (or ``scale * B_e @ A_e``); the engine adds the base.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from es_merging.errors import MergeError


@dataclass(frozen=True)
class Param:
    """One declared hyper-parameter of a merge method."""

    name: str
    type: type  # float, int, str or bool
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None

    def parse(self, raw: Any) -> Any:
        """Coerce and validate a value (from a CLI string, JSON or Python)."""
        try:
            if self.type is not bool and isinstance(raw, bool):
                raise ValueError(raw)  # True is an int in Python, but never a valid number here
            if self.type is bool and not isinstance(raw, (bool, str)):
                raise ValueError(raw)
            if self.type is bool and isinstance(raw, str):
                low = raw.strip().lower()
                if low not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(raw)
                value = low in {"true", "1", "yes"}
            elif self.type is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            else:
                value = self.type(raw)
        except (TypeError, ValueError):
            raise MergeError(
                f"parameter {self.name!r}: {raw!r} is not a valid {self.type.__name__} ({self.help})"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise MergeError(f"parameter {self.name!r}: {raw!r} must be a finite number")
        if self.min is not None and value < self.min:
            raise MergeError(f"parameter {self.name!r}={value} is below its minimum {self.min}")
        if self.max is not None and value > self.max:
            raise MergeError(f"parameter {self.name!r}={value} is above its maximum {self.max}")
        if self.choices is not None and value not in self.choices:
            raise MergeError(f"parameter {self.name!r}={value!r} must be one of {list(self.choices)}")
        return value

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "help": self.help,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices is not None else None,
        }


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges."""

    key: str  # output tensor name
    layer: int | None  # decoder layer index (0-based) or None for non-layer tensors
    generator: torch.Generator  # seeded per tensor: results do not depend on visiting order
    seed: int  # the per-tensor seed the generator was made from
    # ES family only (filled by the engine from the signals):
    layer_lambda: torch.Tensor | None = None  # [E] layer coefficients of this tensor's layer
    element_scores: torch.Tensor | None = None  # [E, *shape] gradient scores S[e, k]
    extras: dict[str, Any] = field(default_factory=dict)


class MergeMethod:
    """Base class. Subclasses set the class attributes and implement ``merge_tensor``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    needs_probe: ClassVar[bool] = False  # needs hidden-state signals from a probe
    needs_layer_coefficients: ClassVar[bool] = False
    needs_element_scores: ClassVar[bool] = False

    def __init__(self, **values: Any):
        declared = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise MergeError(
                f"method {self.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters are {sorted(declared) or 'none'}"
            )
        self.values: dict[str, Any] = {
            p.name: p.parse(values[p.name]) if p.name in values else p.default for p in self.params
        }

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values")
        if values is not None and item in values:
            return values[item]
        raise AttributeError(item)

    def merge_tensor(self, deltas: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        """Merge ``deltas`` of shape [E, *shape] into one tensor of shape ``shape``."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "summary": cls.summary,
            "needs_probe": cls.needs_probe,
            "needs_layer_coefficients": cls.needs_layer_coefficients,
            "needs_element_scores": cls.needs_element_scores,
            "params": [p.describe() for p in cls.params],
        }


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"merge method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str, **values: Any) -> MergeMethod:
    """Instantiate a registered method with validated parameters."""
    import es_merging.methods  # noqa: F401  (fills the registry)

    try:
        cls = REGISTRY[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; choose one of {sorted(REGISTRY)}") from None
    return cls(**values)


def parse_set_options(pairs: list[str] | None) -> dict[str, str]:
    """Parse CLI ``--set name=value`` pairs (values are validated later by ``Param.parse``)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise MergeError(f"--set {pair!r}: expected name=value, e.g. --set temperature=0.5")
        out[name.strip()] = value.strip()
    return out
