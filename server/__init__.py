"""The es-merging MCP server: ``create_server(settings)`` (see ``server.app``).

Kept import-light: a job's worker process imports ``server.jobs`` and nothing else from here."""
from __future__ import annotations

from typing import Any


def create_server(settings: Any = None) -> Any:
    from server.app import create_server as _create

    return _create(settings)


__all__ = ["create_server"]
