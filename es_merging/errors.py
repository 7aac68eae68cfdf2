"""Typed errors. Every message says which item is wrong and what to do about it.

The MCP layer turns these into ``ToolError`` so that the agent sees the message; any other
exception is a bug and stays hidden from the agent.
"""
from __future__ import annotations


class EsMergingError(Exception):
    """Base class of every error raised on purpose by the library."""


class InvalidInputError(EsMergingError, ValueError):
    """One input item (a SMILES, a sequence, a cell profile, a parameter) is not usable."""

    def __init__(self, item: object, reason: str, hint: str | None = None, index: int | None = None):
        self.item = item
        self.reason = reason
        self.hint = hint
        self.index = index
        shown = repr(item) if not isinstance(item, str) or len(item) <= 80 else repr(item[:77] + "...")
        where = f"item {index} " if index is not None else ""
        msg = f"{where}{shown}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ProbeError(EsMergingError):
    """A probe cannot be built, rendered or loaded."""


class ExpertError(EsMergingError):
    """An expert or base model cannot be loaded or is incompatible with the others."""


class MergeError(EsMergingError):
    """A merge cannot be planned or executed (unknown method, bad parameter, missing tensor...)."""


class PathNotAllowedError(EsMergingError):
    """A path argument resolves outside the allowed roots."""
