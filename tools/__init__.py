"""MCP tools, one module per area. Each tool is an implementation ``impl(state, inp) -> Output``
with a pydantic input model and a pydantic output model; :func:`add_tool` publishes it with a flat
argument list (one JSON property per input field, as agents expect), validates the input model
(cross-field checks included), enforces the size limits, runs blocking work in a worker thread,
and turns library errors into ``ToolError`` messages the agent can act on.

The tool names are a contract with agents (DESIGN section 8)."""
from __future__ import annotations

import inspect as _inspect  # alias: the submodule tools.inspect rebinds the name `inspect` here
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ResourceLink, TextContent, ToolAnnotations
from pydantic import BaseModel, ValidationError

from es_merging.errors import EsMergingError

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer

    from server.app import AppState

log = logging.getLogger(__name__)

TOOL_NAMES = (
    "inspect_molecules", "inspect_proteins", "inspect_cell_profiles", "build_probe",
    "list_experts", "register_expert", "start_merge", "get_job", "cancel_job",
    "list_models", "describe_model", "predict_interaction", "start_screen",
)


class Linked(BaseModel):
    """Mixin for outputs that also return MCP resource links (``links`` is not part of the
    structured output; it becomes ``resource_link`` content blocks)."""

    def resource_links(self) -> list[ResourceLink]:
        return []


def link(uri: str, name: str, description: str, mime_type: str) -> ResourceLink:
    return ResourceLink(uri=uri, name=name, description=description, mime_type=mime_type)


def backend_missing(feature: str, module: str, exc: ImportError) -> ToolError:
    """The tool exists but its library backend is not importable in this build."""
    log.info("backend %s unavailable: %r", module, exc)
    return ToolError(
        f"{feature} is not available in this build: the library module {module} cannot be imported "
        f"({type(exc).__name__}: {exc}). Use the other tools meanwhile."
    )


def import_backend(feature: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise backend_missing(feature, module, exc) from None


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        parts.append(f"{where}: {err.get('msg')}")
    more = f" (and {len(exc.errors()) - 8} more)" if len(exc.errors()) > 8 else ""
    return "invalid arguments: " + "; ".join(parts) + more


def compact_schema(node: Any, drop: frozenset[str] = frozenset({"title"})) -> Any:
    """Shrink a pydantic JSON schema without changing what it accepts: drop the generated
    ``title`` annotations (and, for output schemas, descriptions and defaults, which the tool
    description covers) and write ``anyOf [X, null]`` as ``type: [X, "null"]``. Keeps the tool
    catalog small: agents pay for every byte of tools/list in their context."""
    if isinstance(node, list):
        return [compact_schema(v, drop) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        # property names live only inside the mappings below, so a key here is a keyword
        if key in drop or (key == "default" and value is None):
            continue
        if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
            out[key] = {name: compact_schema(sub, drop) for name, sub in value.items()}
        else:
            out[key] = compact_schema(value, drop)
    branches = out.get("anyOf")
    if isinstance(branches, list) and all(isinstance(b, dict) for b in branches):
        if all(set(b) == {"type"} and isinstance(b["type"], str) for b in branches):
            del out["anyOf"]  # anyOf of bare types -> one type list
            out["type"] = [b["type"] for b in branches]
        elif len(branches) == 2 and {"type": "null"} in branches:
            other = branches[0] if branches[1] == {"type": "null"} else branches[1]
            if isinstance(other.get("type"), str) and not (set(other) & set(out) - {"anyOf"}):
                del out["anyOf"]
                out.update(other)
                out["type"] = [other["type"], "null"]
    return out


def add_tool(
    server: "MCPServer",
    state: "AppState",
    impl: Callable[..., Any],
    *,
    name: str,
    title: str,
    description: str,
    input_model: type[BaseModel],
    output_model: type[BaseModel],
    read_only: bool,
    idempotent: bool,
    destructive: bool = False,
    blocking: bool = True,
) -> None:
    """Publish ``impl(state, inp[, ctx]) -> output_model`` as an MCP tool.

    ``blocking`` impls are sync and run in a worker thread; otherwise ``impl`` is async. An impl
    that declares a ``ctx`` parameter receives the MCP ``Context`` (for progress notifications)."""
    wants_ctx = "ctx" in _inspect.signature(impl).parameters
    params = []
    annotations: dict[str, Any] = {}
    for field_name, field in input_model.model_fields.items():
        annotation = field.annotation
        params.append(_inspect.Parameter(field_name, _inspect.Parameter.KEYWORD_ONLY, default=field, annotation=annotation))
        annotations[field_name] = annotation
    params.append(_inspect.Parameter("ctx", _inspect.Parameter.KEYWORD_ONLY, annotation=Context))
    annotations["ctx"] = Context
    annotations["return"] = output_model

    async def tool(**kwargs: Any) -> Any:
        ctx = kwargs.pop("ctx", None)
        try:
            state.require_open()
            state.check_sizes(kwargs)
            inp = input_model.model_validate(kwargs)
            extra = {"ctx": ctx} if wants_ctx else {}
            if blocking:
                out = await anyio.to_thread.run_sync(lambda: impl(state, inp, **extra))
            else:
                out = await impl(state, inp, **extra)
        except ValidationError as exc:
            raise ToolError(_validation_message(exc)) from None
        except EsMergingError as exc:
            raise ToolError(str(exc)) from None
        if not isinstance(out, output_model):
            out = output_model.model_validate(out)
        structured = out.model_dump(mode="json", by_alias=True)
        content: list[Any] = [TextContent(type="text", text=json.dumps(structured, separators=(",", ":")))]
        if isinstance(out, Linked):
            content.extend(out.resource_links())
        return CallToolResult(content=content, structured_content=structured)

    tool.__name__ = name
    tool.__qualname__ = name
    tool.__doc__ = description
    tool.__signature__ = _inspect.Signature(params, return_annotation=output_model)  # type: ignore[attr-defined]
    tool.__annotations__ = annotations
    server.add_tool(
        tool,
        name=name,
        title=title,
        description=description,
        annotations=ToolAnnotations(
            read_only_hint=read_only,
            destructive_hint=None if read_only else destructive,
            idempotent_hint=idempotent,
            open_world_hint=False,
        ),
        structured_output=True,
    )
    registered = server._tool_manager.get_tool(name)  # noqa: SLF001 - the SDK offers no schema hook
    if registered is not None:
        # unknown arguments are errors (a misspelt optional argument must not be silently ignored)
        arg_model = registered.fn_metadata.arg_model
        arg_model.model_config["extra"] = "forbid"
        arg_model.model_rebuild(force=True)
        registered.parameters = compact_schema(arg_model.model_json_schema(by_alias=True))
        registered.fn_metadata.output_schema = compact_schema(
            registered.fn_metadata.output_schema, frozenset({"title", "description", "default", "required"}))


def register_all(server: "MCPServer", state: "AppState") -> None:
    import importlib

    # importlib: the name ``inspect`` in this package's namespace is the stdlib module
    for name in ("inspect", "probes", "experts", "jobs", "models"):
        importlib.import_module(f"tools.{name}").register(server, state)


__all__ = ["TOOL_NAMES", "Linked", "add_tool", "backend_missing", "import_backend", "link", "register_all"]
