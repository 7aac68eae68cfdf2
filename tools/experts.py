"""list_experts and register_expert: the registry of mergeable experts."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from es_merging.errors import EsMergingError
from server.security import check_id
from tools import add_tool

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer

    from server.app import AppState


class ExpertOut(BaseModel):
    id: str
    name: str
    modality: str | None
    kind: str = Field(description="lora or dense")
    rank: int | None
    base_hash: str | None = Field(description="first 23 characters of the base content hash")
    path: str
    source: str = Field(description="zoo or user")


def expert_out(row: dict[str, Any]) -> ExpertOut:
    return ExpertOut(
        id=row["id"], name=row["name"], modality=row["modality"], kind=row["kind"], rank=row["rank"],
        base_hash=row["base_hash"][:23] if row["base_hash"] else None, path=row["path"], source=row["source"],
    )


class ListExpertsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modality: str | None = Field(None, description="filter, e.g. molecule, protein, cell")


class ListExpertsOutput(BaseModel):
    experts: list[ExpertOut]
    note: str | None = Field(None, description="e.g. the embedded zoo is still being built")


def list_experts(state: "AppState", inp: ListExpertsInput) -> ListExpertsOutput:
    assert state.store is not None
    rows = state.store.list_experts(inp.modality)
    return ListExpertsOutput(experts=[expert_out(r) for r in rows], note=bootstrap_note(state))


def bootstrap_note(state: "AppState") -> str | None:
    if state.bootstrap_job and state.runner is not None:
        job = state.runner.get(state.bootstrap_job)
        if job and job["state"] in ("queued", "running"):
            pct = f"{100 * job['done'] / job['total']:.0f}% of " if job["total"] else ""
            return (f"the embedded zoo is being built (job {state.bootstrap_job}: {pct}stage {job['stage']}); "
                    "its experts appear here when it finishes")
        if job and job["state"] != "succeeded":
            return f"building the embedded zoo {job['state']}: {job['error']}"
    return state.bootstrap_note


class RegisterExpertInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, max_length=32, description="expert directories")
    names: list[str] | None = Field(None, description="ids, same order (default from expert.json)")

    @model_validator(mode="after")
    def _same_length(self) -> "RegisterExpertInput":
        if self.names is not None and len(self.names) != len(self.paths):
            raise ValueError(f"names has {len(self.names)} entries but paths has {len(self.paths)}")
        return self


class RegisterResult(BaseModel):
    index: int
    path: str
    ok: bool
    expert: ExpertOut | None = None
    already_registered: bool = False
    error: str | None = None


class RegisterExpertOutput(BaseModel):
    n_ok: int
    n_failed: int
    results: list[RegisterResult]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:64] or "expert"


def register_expert(state: "AppState", inp: RegisterExpertInput) -> RegisterExpertOutput:
    from es_merging.experts import load_expert_spec

    assert state.store is not None
    results: list[RegisterResult] = []
    for i, raw in enumerate(inp.paths):
        try:
            path = state.input_path(raw, f"paths[{i}]", kind="dir")
            existing = state.store.find_expert_by_path(str(path))
            if existing is not None:
                results.append(RegisterResult(index=i, path=raw, ok=True, expert=expert_out(existing), already_registered=True))
                continue
            spec = load_expert_spec(path)
            wanted = inp.names[i] if inp.names else None
            if wanted is not None:
                check_id(wanted, "expert name")
                if state.store.id_taken("experts", wanted):
                    raise EsMergingError(f"expert id {wanted!r} is taken; choose another name")
                expert_id = wanted
            else:
                expert_id = state.store.unique_id("experts", _slug(spec.name))
            register_spec(state, expert_id, spec, source="user")
            results.append(RegisterResult(index=i, path=raw, ok=True, expert=expert_out(state.store.get_expert(expert_id))))
        except EsMergingError as exc:
            results.append(RegisterResult(index=i, path=raw, ok=False, error=str(exc)))
    n_ok = sum(r.ok for r in results)
    return RegisterExpertOutput(n_ok=n_ok, n_failed=len(results) - n_ok, results=results)


def register_spec(state: "AppState", expert_id: str, spec: Any, *, source: str) -> None:
    assert state.store is not None
    state.store.add_expert(
        expert_id, name=spec.name, path=str(spec.path), modality=spec.modality, kind=spec.kind,
        base_hash=spec.base_hash, rank=spec.rank, source=source,
        meta={"encoder": str(spec.encoder_dir) if spec.encoder_dir else None},
    )


def register(server: "MCPServer", state: "AppState") -> None:
    add_tool(
        server, state, list_experts, name="list_experts", title="List registered experts",
        input_model=ListExpertsInput, output_model=ListExpertsOutput, read_only=True, idempotent=True,
        description=(
            "Experts start_merge can merge: id, modality, kind (lora/dense), rank, base hash (merged experts "
            "must share a base). The embedded zoo's molecule, protein and cell experts are registered at first start."),
    )
    add_tool(
        server, state, register_expert, name="register_expert", title="Register expert directories",
        input_model=RegisterExpertInput, output_model=RegisterExpertOutput, read_only=False, idempotent=True,
        description=(
            "Register expert directories (PEFT LoRA adapter or dense checkpoint; optional expert.json with "
            "modality and base hash) for start_merge. Checked per item (missing files, pickle weights, paths "
            "outside the allowed roots). Re-registering a path returns its existing id."),
    )
