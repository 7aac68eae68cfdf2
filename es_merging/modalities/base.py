"""What every modality shares: the per-item result model and the modality registry.

Batch-first: ``inspect`` functions take a list and return one :class:`ItemResult` per item, so one
bad SMILES / sequence / cell never sinks the batch. Only errors raised on purpose
(:class:`~es_merging.errors.InvalidInputError`) become ``ok=False`` results; anything else is a bug
and propagates.
"""
from __future__ import annotations

import importlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pydantic import BaseModel, Field

from es_merging.errors import InvalidInputError

DISPLAY_CHARS = 200


def display(item: object, limit: int = DISPLAY_CHARS) -> str:
    """A short, printable form of an input item (results echo it; a 5 MB FASTA or a 30,000-gene
    mapping must not be copied whole: containers show their first entries, in order)."""
    if isinstance(item, str):
        text = item
    elif isinstance(item, Mapping):
        head = list(itertools.islice(item.items(), 12))
        text = "{" + ", ".join(f"{k!r}: {v!r}" for k, v in head) + (", ...}" if len(item) > len(head) else "}")
    elif isinstance(item, (list, tuple)):
        head = list(item[:16])
        text = "[" + ", ".join(map(repr, head)) + (", ...]" if len(item) > len(head) else "]")
    else:
        text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ItemResult(BaseModel):
    """The outcome of validating and describing one input item."""

    index: int = Field(description="position in the returned list: the item's position in the batch, "
                                   "except that one h5ad item expands to one result per cell")
    input: str = Field(description=f"the item as given, truncated to {DISPLAY_CHARS} characters")
    ok: bool
    error: str | None = Field(default=None, description="why the item is unusable (ok=False)")
    warnings: list[str] = Field(default_factory=list)
    descriptors: dict[str, Any] | None = None


def error_result(index: int, item: object, exc: InvalidInputError) -> ItemResult:
    """An ``ok=False`` result. The message quotes the item itself so that it stands alone (an agent
    may read only the error)."""
    return ItemResult(index=index, input=display(item), ok=False, error=str(exc))


def check_batch(items: object, max_items: int, what: str) -> list:
    """The batch itself must be a list (a bare string would be iterated character by character, a
    single gene->value mapping key by key)."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise InvalidInputError(display(items, 80), f"expected a list of {what}, got {type(items).__name__}",
                                hint=f"wrap a single {what[:-1]} in a list")
    items = list(items)
    if len(items) > max_items:
        raise InvalidInputError(f"<{len(items)} {what}>", f"batch too large: {len(items)} > max_items={max_items}",
                                hint="split the batch or raise max_items")
    return items


@dataclass(frozen=True)
class Modality:
    """A registry entry. The implementing module is imported on first use so that importing the
    registry (e.g. for ``--help``) does not pay for RDKit / AnnData."""

    name: str
    module: str
    function: str
    description: str

    def inspect(self, items: list, **kw: Any) -> list[ItemResult]:
        func: Callable[..., list[ItemResult]] = getattr(importlib.import_module(self.module), self.function)
        return func(items, **kw)


MODALITIES: dict[str, Modality] = {}


def register_modality(modality: Modality) -> Modality:
    if modality.name in MODALITIES:
        raise ValueError(f"modality {modality.name!r} is already registered")
    MODALITIES[modality.name] = modality
    return modality


def get_modality(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise InvalidInputError(name, "unknown modality", hint=f"one of {sorted(MODALITIES)}") from None


register_modality(Modality("molecule", "es_merging.modalities.molecule", "inspect_molecules",
                           "small molecules as SMILES (RDKit)"))
register_modality(Modality("protein", "es_merging.modalities.protein", "inspect_proteins",
                           "protein sequences, raw or FASTA (Biopython)"))
register_modality(Modality("cell", "es_merging.modalities.cell", "inspect_cell_profiles",
                           "single-cell expression profiles: h5ad rows, gene->value mappings, ranked gene lists"))
