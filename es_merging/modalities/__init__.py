"""Input modalities: validate, describe and compare molecules, proteins and cells.

The registry (:data:`MODALITIES`) imports each implementation on first use; import the
submodules (``es_merging.modalities.molecule`` ...) for their functions.
"""
from es_merging.modalities.base import MODALITIES, ItemResult, Modality, get_modality, register_modality

__all__ = ["MODALITIES", "ItemResult", "Modality", "get_modality", "register_modality", "inspect"]


def inspect(modality: str, items: list, **kw) -> list[ItemResult]:
    """``inspect("molecule", ["CCO"])``: validate and describe a batch of one modality."""
    return get_modality(modality).inspect(items, **kw)
