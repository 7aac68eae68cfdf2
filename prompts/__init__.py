"""MCP prompts: workflow templates that walk an agent through the tools."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer

PROMPT_NAMES = ("screen_compound_library", "merge_and_explain", "explain_prediction")


def register_all(server: "MCPServer", state: Any = None) -> None:
    from prompts.workflows import register

    register(server)
