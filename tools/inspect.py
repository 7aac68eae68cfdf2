"""Inspection tools: validate and describe raw inputs item by item (never all-or-nothing)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tools import add_tool, import_backend

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer

    from server.app import AppState


class Item(BaseModel):
    index: int
    input: str = Field(description="the item as given (truncated)")
    ok: bool
    error: str | None = None
    warnings: list[str] = []
    descriptors: dict[str, Any] | None = None


class InspectOutput(BaseModel):
    n: int
    n_ok: int
    n_failed: int
    items: list[Item]


def _output(results: list[Any]) -> InspectOutput:
    items = [Item.model_validate(r.model_dump() if hasattr(r, "model_dump") else r) for r in results]
    n_ok = sum(1 for i in items if i.ok)
    return InspectOutput(n=len(items), n_ok=n_ok, n_failed=len(items) - n_ok, items=items)


# ----------------------------------------------------------------------------- molecules


class InspectMoleculesInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    smiles: list[str] = Field(min_length=1)


def inspect_molecules(state: "AppState", inp: InspectMoleculesInput) -> InspectOutput:
    mod = import_backend("inspect_molecules", "es_merging.modalities.molecule")
    return _output(mod.inspect_molecules(inp.smiles, max_items=state.settings.max_list))


# ----------------------------------------------------------------------------- proteins


class InspectProteinsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list[str] = Field(min_length=1, description="raw one-letter sequences or FASTA text")
    policy: Literal["keep", "replace", "reject"] = Field("keep", description="ambiguous residues X/B/Z/U/O")


def inspect_proteins(state: "AppState", inp: InspectProteinsInput) -> InspectOutput:
    mod = import_backend("inspect_proteins", "es_merging.modalities.protein")
    return _output(mod.inspect_proteins(inp.sequences, policy=inp.policy, max_items=state.settings.max_list))


# ----------------------------------------------------------------------------- cells


class InspectCellsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profiles: list[dict[str, float] | list[str]] | None = Field(
        None, description="each a {gene: value} mapping or a ranked gene list (most expressed first)")
    h5ad_path: str | None = Field(None, description=".h5ad file (instead of profiles)")
    obs: list[str] | None = Field(None, description="h5ad cell names to read")
    limit: int = Field(20, ge=1, le=1000, description="h5ad without obs: first N cells")
    top_k: int = Field(16, ge=1, le=500, description="genes kept in the text span")

    @model_validator(mode="after")
    def _one_source(self) -> "InspectCellsInput":
        if (self.profiles is None) == (self.h5ad_path is None):
            raise ValueError("give exactly one of profiles or h5ad_path")
        return self


def inspect_cell_profiles(state: "AppState", inp: InspectCellsInput) -> InspectOutput:
    mod = import_backend("inspect_cell_profiles", "es_merging.modalities.cell")
    if inp.h5ad_path is not None:
        path = state.input_path(inp.h5ad_path, "h5ad_path", kind="file")
        request: dict[str, Any] = {"h5ad": str(path), "limit": None if inp.obs else inp.limit}
        if inp.obs:
            request["obs"] = inp.obs
        items: list[Any] = [request]  # expands to one result per cell
    else:
        items = list(inp.profiles or [])
    return _output(mod.inspect_cell_profiles(items, top_k=inp.top_k, max_items=state.settings.max_list))


def register(server: "MCPServer", state: "AppState") -> None:
    common = dict(read_only=True, idempotent=True, output_model=InspectOutput)
    add_tool(
        server, state, inspect_molecules, name="inspect_molecules", title="Inspect molecules (SMILES)",
        input_model=InspectMoleculesInput,
        description=(
            "Validate and describe small molecules given as SMILES, each on its own: canonical SMILES, "
            "InChIKey, formula, MW, LogP, TPSA, HBD/HBA, rotatable bonds, aromatic rings, QED, Lipinski. "
            "Use before build_probe/predict_interaction. One result per item (ok=false with RDKit's reason)."),
        **common)
    add_tool(
        server, state, inspect_proteins, name="inspect_proteins", title="Inspect protein sequences",
        input_model=InspectProteinsInput,
        description=(
            "Validate and describe protein sequences (raw or FASTA), each on its own: cleaned sequence, "
            "length, MW, pI, GRAVY, instability, aromaticity. Ambiguous residues follow `policy`; "
            "invalid characters are errors with their position. One result per item."),
        **common)
    add_tool(
        server, state, inspect_cell_profiles, name="inspect_cell_profiles", title="Inspect single-cell profiles",
        input_model=InspectCellsInput,
        description=(
            "Validate and describe single-cell profiles, inline (gene->value or ranked genes) or from an .h5ad: "
            "top-k genes (the span models see), library size, raw vs normalised, unknown genes, NaN/negatives. "
            "One result per cell."),
        **common)
